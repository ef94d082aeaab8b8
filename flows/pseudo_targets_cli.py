"""`bfr-curate prior inspect|convert|train` and `bfr-curate pseudo-targets`.

Wired into the main parser by ``add_prior_parsers(subparsers, common)``; errors are ValueError /
FileNotFoundError subclasses with one-line messages (worded by flows/errors.py, exit 2).
"""

from __future__ import annotations

import json

PRIOR_HELP = ("A prior is a folder (local or fsspec URL) written by `prior convert` or `prior train`: "
              "prior.json, unet/ (diffusers UNet2DModel) and scheduler/ (DDPM schedule); or the name of a "
              "model card whose guided-diffusion checkpoint is in the model cache (`bfr-curate models pull`).")


def cmd_prior_inspect(args) -> None:
    from bfr_models.diffusion.prior import inspect_prior

    info = inspect_prior(args.prior)
    s = info.pop("schedule")
    print(f"prior:      {info['uri']}")
    print(f"resolution: {info['resolution']}  channels in/out {info['in_channels']}/{info['out_channels']}  "
          f"{info['parameters'] / 1e6:.2f}M parameters ({info['unet_class']})")
    print(f"schedule:   {s['betas']} betas {s['beta_start']:g}..{s['beta_end']:g}, T={s['T']}, "
          f"{s['prediction']} prediction, alpha_bar_T={s['alpha_bar_T']:.3g}")
    print(f"variance:   {info['variance_type']}")
    print(f"sha256:     {info['sha256']}")
    if info.get("source"):
        print(f"source:     {json.dumps(info['source'], sort_keys=True, default=str)}")


def cmd_prior_convert(args) -> None:
    from bfr_models import storage
    from flows.prior import convert_adm

    if not storage.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    uri = convert_adm(args.checkpoint, args.arch, args.out)
    print(f"prior: {uri}  (inspect with: bfr-curate prior inspect {uri})")


def cmd_prior_train(args, run) -> None:
    from bfr_models import storage
    from bfr_models.diffusion.train import PriorTrainConfig
    from flows.cluster import check_device
    from flows.prior import prior_train_flow

    channels = tuple(int(c) for c in args.channels.split(","))
    PriorTrainConfig(resolution=args.resolution, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     channels=channels, checkpoint_every=args.checkpoint_every)  # validates, one line
    check_device(args.device, args.dask)
    if not storage.exists(args.input):
        raise FileNotFoundError(f"input not found: {args.input}")
    uri = run(prior_train_flow, args, input=args.input, out=args.out, resolution=args.resolution,
              steps=args.steps, batch_size=args.batch_size, lr=args.lr, channels=channels,
              checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, exclude=args.exclude)
    print(f"prior: {uri}  (inspect with: bfr-curate prior inspect {uri})")


def add_precision(p) -> None:
    """--dtype and --compile of the commands that sample with a UNet (bfr_models.device)."""
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="UNet precision: bf16 autocast (CUDA only) or fp32 (default: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CUDA only; pays off when the images share one size: 2.6x the "
                        "eager bf16 rate for DR2 with an ADM-256 prior on an H200, after a ~40-s first batch)")


def pseudo_target_options(args) -> dict:
    return dict(input=args.input, prior=args.prior, method=args.method, N=args.N, tau=args.tau, omega=args.omega,
                K=args.K, L=args.L, n2=args.n2, scale=args.scale, t_start=args.t_start, warmup=args.warmup,
                respace=args.respace, variance_type=args.variance_type,
                restorer=args.restorer, resize=args.resize, best_of=args.best_of,
                fidelity_limit=args.fidelity_limit, auto=args.auto, auto_grid=args.auto_grid,
                auto_metric=args.auto_metric, auto_sample=args.auto_sample, seed=args.seed, dtype=args.dtype,
                exclude=args.exclude, gate=args.gate, compile=args.compile)


def cmd_pseudo_targets(args, run, print_result) -> None:
    from flows.pseudo_targets import gate_summary, plan_gate, plan_pseudo_targets, pseudo_targets_flow
    from flows.warm import warm_in_background
    from tasks.pseudo_targets import warm

    o = pseudo_target_options(args)
    params = {k: o[k] for k in ("N", "tau", "omega", "K", "L", "n2", "scale", "t_start", "warmup", "respace",
                                 "variance_type")}
    p, loaded, *_ = plan_pseudo_targets(o["input"], o["prior"], o["method"], params, o["restorer"], o["resize"],
                                        o["best_of"], o["dtype"], args.device, o["auto"], o["auto_grid"],
                                        o["auto_metric"], o["exclude"], o["gate"], o["compile"])
    scorers = plan_gate(o["gate"], o["input"], loaded.resolution, o["resize"], p.upscale)[2]
    warm_in_background(args.dask, args.device, warm, scorers["gate_musiq"], scorers["gate_identity"], args.device)
    uri = run(pseudo_targets_flow, args, out=args.out, shard_size=args.shard_size, batch_size=args.batch_size,
              device=args.device, **o)
    print_result("pseudo-targets", uri)
    if o["auto"]:
        from bfr_models import manifest
        from flows.readable import auto_grid

        search = manifest.read_index(uri)["config"].get("auto")
        if search:
            print(auto_grid(search))
    print(gate_summary(uri))
    from flows.check_summary import resized_note

    note = resized_note(uri, "prior", "(antialiased bicubic; params.resize records the sizes)")
    if note:
        print(note)


def add_prior_parsers(sub, add_common, run, print_result) -> None:
    from bfr_models.choices import DEFAULT_RESPACE, VARIANCE_TYPES
    from bfr_models.choices import PSEUDO_TARGET_METHODS as METHODS
    from bfr_models.choices import PSEUDO_TARGET_RESIZE_MODES as RESIZE_MODES
    from flows.cli import add_exclude, add_training_dask
    from bfr_models.choices import AUTO_METRICS

    p = sub.add_parser("prior", help="inspect, convert or train a diffusion prior", description=PRIOR_HELP)
    psub = p.add_subparsers(dest="prior_command", required=True, metavar="SUBCOMMAND")
    q = psub.add_parser("inspect", help="resolution, schedule, variance type, parameters and sha256 of a prior")
    q.add_argument("prior", help="prior folder / fsspec URL, or a model card name")
    q.set_defaults(func=cmd_prior_inspect)

    q = psub.add_parser("convert", help="convert a guided-diffusion (ADM / iDDPM) checkpoint to a prior folder",
                        description="Maps every tensor of an ADM state dict onto the equivalent diffusers UNet "
                                    "and checks its shape; a checkpoint of another architecture is refused.")
    q.add_argument("checkpoint", help="the .pt / .pth file (local or fsspec URL)")
    q.add_argument("--from", dest="source_format", choices=["adm"], default="adm", help="checkpoint format (adm)")
    q.add_argument("--arch", required=True, choices=["ffhq256", "ffhq512"],
                   help="ffhq256: DR2's FFHQ-256 ADM; ffhq512: DifFace's FFHQ-512 iDDPM")
    q.add_argument("-o", "--out", required=True, help="prior folder to write (local or fsspec URL)")
    q.set_defaults(func=cmd_prior_convert)

    q = psub.add_parser("train", help="train a small domain prior on a manifest (progress bar, checkpoints)",
                        description="Trains a small UNet2DModel with DDPM's loss on the images of --input, "
                                    "resized to --resolution. Writes <out>/prior/<key>/ and checkpoints the whole "
                                    "training state there, so rerunning after an interruption resumes.")
    q.add_argument("-i", "--input", required=True, help="manifest or folder of (clean) faces")
    q.add_argument("-o", "--out", required=True, help="output root (local or fsspec URL)")
    q.add_argument("--resolution", type=int, default=64, help="training resolution in pixels (default 64)")
    q.add_argument("--steps", type=int, default=2000, help="optimisation steps (default 2000)")
    q.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    q.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (default 2e-4)")
    q.add_argument("--channels", default="32,64,64", help="UNet channels per level (default 32,64,64)")
    q.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    q.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    q.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    add_training_dask(q)
    add_exclude(q)
    q.set_defaults(func=lambda args: cmd_prior_train(args, run))

    p = sub.add_parser(
        "pseudo-targets", help=f"clean pseudo targets from LQ faces with a diffusion prior ({', '.join(METHODS)})",
        description="dr2: DR2 (diffuse the LQ to omega, low-pass replacement down to tau, one-shot x0). "
                    "lowfreq: the unsupervised-BFR Algorithm 1 (restorer output noised to K, low-pass "
                    "replacement while t > L, free steps below). polish: DiffBFR's truncated TEM (noise to n2, "
                    "denoise). difbfsr: DifBFSR zero-shot x4 super-resolution (per-image SR and contraction "
                    "modules fitted to the LR input while sampling; LR faces of prior resolution / 4 in, prior-resolution targets out). "
                    "Timesteps are on the T=1000 scale. --auto searches N and tau (K for lowfreq) on "
                    "a sample, scoring NIQE (or MUSIQ) under a low-frequency PSNR limit. " + PRIOR_HELP)
    p.add_argument("-i", "--input", required=True, help="manifest or folder of LQ faces")
    p.add_argument("--prior", required=True, help="prior folder / fsspec URL, or a model card name")
    p.add_argument("--method", default="dr2", choices=METHODS, help="pseudo-target method: " + ", ".join(METHODS))
    # the papers' letters (N, K, L) stay as short and long aliases of the lower-case names
    p.add_argument("-N", "--n-factor", "--N", dest="N", type=int, default=None,
                   help="low-pass factor Phi_N (default: dr2 4, lowfreq 16)")
    p.add_argument("--tau", type=int, default=None, help="dr2: output step (default 220)")
    p.add_argument("--omega", type=int, default=None, help="dr2: start step (default tau + 250)")
    p.add_argument("-K", "--k-start", "--K", dest="K", type=int, default=None,
                   help="lowfreq: start step K (default 600)")
    p.add_argument("-L", "--l-end", "--L", dest="L", type=int, default=None,
                   help="lowfreq: last constrained step L (default 360)")
    p.add_argument("--n2", type=int, default=None, help="polish: start step (default 100)")
    p.add_argument("--scale", type=int, default=None, help="difbfsr: super-resolution factor (default 4)")
    p.add_argument("--t-start", type=int, default=None, help="difbfsr: truncated start step (default 401)")
    p.add_argument("--warmup", type=int, default=None, help="difbfsr: module updates before sampling (default 100)")
    p.add_argument("--respace", type=int, default=None,
                   help="respaced steps of T=1000 (defaults: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_RESPACE.items()) + ")")
    p.add_argument("--variance-type", default=None, choices=VARIANCE_TYPES,
                   help="reverse-step variance (default: learned range for 6-channel priors, else fixed large)")
    p.add_argument("--restorer", default=None,
                   help="y0 = R(y) for lowfreq/polish: none, bicubic, or a checkpoint (our SmallRestorer or any "
                        "architecture spandrel loads)")
    p.add_argument("--resize", default="input", choices=RESIZE_MODES,
                   help="images whose size differs from the prior's: resize in and write at the input size "
                        "(input, default), write at the prior's size (prior), or refuse")
    p.add_argument("--best-of", type=int, default=1, help="samples per image; the best by NIQE under the limit is kept")
    p.add_argument("--fidelity-limit", type=float, default=20.0,
                   help="minimum low-frequency PSNR (dB) for --auto and --best-of (default 20)")
    p.add_argument("--auto", action="store_true", help="choose N and tau (K for lowfreq) on a sample of the input")
    p.add_argument("--auto-grid", default=None, help="override the grid, e.g. 'N=4,8,16;tau=100,200,300'")
    p.add_argument("--auto-metric", default="niqe", choices=AUTO_METRICS, help="quality score for --auto")
    p.add_argument("--auto-sample", type=int, default=8, help="images the --auto search runs on (default 8)")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's seeds derive from it (default 0)")
    add_precision(p)
    p.add_argument("--gate", default=None, metavar="YAML",
                   help="quality-gate thresholds (default: catalogs/gate/pseudo_targets.yaml); every target gets "
                        "gate=pass/fail and gate_reason, failed ones are left out of finetune pairs")
    add_common(p, shard_size=64, batch_size=8, gpu_batch_from_memory=True)
    p.set_defaults(func=lambda args: cmd_pseudo_targets(args, run, print_result))
