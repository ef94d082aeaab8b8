"""`bfr-curate finetune`, `restore`, `idm train`, `clean` and `schedule`.

Wired into the main parser by ``add_training_parsers``; errors are ValueError / FileNotFoundError
subclasses with one-line messages (worded by flows/errors.py, exit 2), raised before any work.
"""

from __future__ import annotations

import sys

from flows.pseudo_targets_cli import add_precision


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def cmd_finetune(args, run) -> None:
    from flows.cluster import check_device
    from flows.finetune import finetune_flow, plan_finetune

    knobs = dict(iters=args.iters, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr,
                 val_pairs=args.val_pairs, validate_every=args.validate_every, checkpoint_every=args.checkpoint_every,
                 precision=args.precision, seed=args.seed)
    cfg = plan_finetune(args.pairs, args.restorer, args.real, args.config, knobs, args.exclude,
                        include_failed=args.include_failed, no_lpips=args.no_lpips)[-1]
    check_device(args.device, args.dask)
    if args.no_lpips and hasattr(cfg, "lpips_weight"):
        print("finetune: warning: --no-lpips: the LPIPS term is dropped (lpips_weight 0; L1 and GAN only), so the "
              "restorer is trained without the recipe's perceptual loss", file=sys.stderr)
    uri = run(finetune_flow, args, pairs=args.pairs, restorer=args.restorer, real=args.real, out=args.out,
              config=args.config, device=args.device, exclude=args.exclude, include_failed=args.include_failed,
              no_lpips=args.no_lpips, **knobs)
    from bfr_models import manifest, storage

    index = manifest.read_index(uri)["config"]
    print(f"finetune: {index['train_pairs']} training pairs, {index['val_pairs']} held out "
          f"({index['skipped_pairs']} error or gate-failed rows skipped)")
    print(f"  restorer: {index['restorer_uri']}  (trained at {index['resolution']} px: `restore` applies it at "
          f"that size)")
    print(f"  log:      {index['log_uri']}")
    print(f"  manifest: {storage.join(uri, manifest.INDEX_NAME)}")
    for k, v in sorted(index["final_validation"].items()):
        print(f"  {k}: {v:.4f}")


def cmd_restore(args, run, print_result) -> None:
    from flows.restore import plan_restore, restore_flow

    plan_restore(args.input, args.restorer, args.device)
    uri = run(restore_flow, args, input=args.input, restorer=args.restorer, out=args.out, shard_size=args.shard_size,
              batch_size=args.batch_size, device=args.device, exclude=args.exclude)
    print_result("restore", uri)
    from flows.check_summary import resized_note

    note = resized_note(uri, "restorer")
    if note:
        print(note)


def _idm_train_options(args) -> dict:
    return dict(resolution=args.resolution, crop=args.crop, channels=_ints(args.channels),
                layers_per_block=args.layers_per_block, attention=_ints(args.attention), norm_groups=args.norm_groups,
                iters=args.iters, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, preset=args.preset,
                checkpoint_every=args.checkpoint_every, seed=args.seed)


def cmd_idm_train(args, run) -> None:
    from flows.cluster import check_device
    from flows.idm import idm_train_flow, plan_idm_train

    o = _idm_train_options(args)
    train = {k: o[k] for k in ("iters", "batch_size", "lr", "warmup", "preset", "checkpoint_every", "seed")}
    plan_idm_train(args.input, o["resolution"], o["crop"], o["channels"], o["layers_per_block"], o["attention"],
                   o["norm_groups"], train, args.exclude)
    check_device(args.device, args.dask)
    uri = run(idm_train_flow, args, input=args.input, out=args.out, device=args.device, exclude=args.exclude, **o)
    px = o["resolution"]
    print(f"idm model: {uri}  (trained at {px}x{px} px)")
    print(f"  clean an HQ face dataset with it: bfr-curate clean --input <faces, ideally {px}x{px}> --model {uri} "
          f"--out {args.out}")
    print(f"  (images of other sizes are resized to {px} px for the model and back; the acceptance judges every "
          f"cleaned image against its original)")


def cmd_clean(args, run, print_result) -> None:
    from bfr_models.idm import load_acceptance
    from flows.idm import clean_flow, plan_clean

    acceptance = dict(lowpass_N=args.lowpass_n, min_lowpass_psnr=args.min_lowpass_psnr, max_lpips=args.max_lpips,
                      min_identity=args.min_identity, max_chroma_shift=args.max_chroma_shift)
    load_acceptance(args.acceptance, **acceptance)  # a bad thresholds file or value: one line, before any work
    plan_clean(args.input, args.model, args.rounds, args.steps, args.variance, args.passes, args.degrade_source,
               args.dtype, args.device, args.compile)
    from bfr_models import storage
    from flows.idm import clean_scorers
    from flows.warm import warm_in_background
    from tasks.clean import warm

    warm_in_background(args.dask, args.device, warm, storage.normalize(args.model), args.device,
                       *clean_scorers(None, None, None, None, []))
    uri = run(clean_flow, args, input=args.input, out=args.out, model=args.model, rounds=args.rounds, steps=args.steps,
              variance=args.variance, passes=args.passes, degrade_source=args.degrade_source,
              round_iters=args.round_iters, round_batch_size=args.round_batch_size, seed=args.seed,
              shard_size=args.shard_size, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
              compile=args.compile, acceptance=args.acceptance, exclude=args.exclude, **acceptance)
    print_result("clean", uri)
    from bfr_models import manifest
    from flows.check_summary import not_checked_text, rejected_text

    config = manifest.read_index(uri)["config"]
    for r in config["rounds"]:
        print(f"  round {r['round']}: {r['replaced']} of {r['images']} images replaced (model {r['model']})")
        print(f"    {rejected_text(r.get('rejected_by') or {})}")
        if r.get("resized"):
            px = r["model_px"]
            print(f"    {r['resized']} images resized to the model's {px}x{px} px and back (columns model_px, resized)")
    if config.get("not_computed"):
        print(f"  {not_checked_text(config['not_computed'], 'not computed (their checks skipped)')}")


def cmd_schedule(args) -> None:
    from flows.schedule import serve_recipe

    serve_recipe(args.recipe, args.cron, args.interval, args.out, args.device, args.name, args.limit)


def add_training_parsers(sub, add_common, run, print_result) -> None:
    from bfr_models.choices import IDM_DEGRADE_SOURCES as DEGRADE_SOURCES
    from bfr_models.choices import IDM_VARIANCES as VARIANCES
    from flows.cli import add_exclude, add_training_dask

    p = sub.add_parser("finetune", help="fine-tune a restorer on pseudo-target pairs (L1 + LPIPS + GAN)",
                       description="The unsupervised-BFR objective: L1 + 0.1 LPIPS(VGG) + 0.1 GAN with a U-Net "
                                   "discriminator (spectral norm) trained from scratch on --real faces; AdamW, "
                                   "cosine LR, batch 16 from micro-batches of 4 (catalogs/finetune/"
                                   "unsupervised_bfr.yaml). A CodeFormer checkpoint gets CodeFormer's code-level "
                                   "recipe instead (frozen codebook/decoder, feature + 0.5 token loss; "
                                   "catalogs/finetune/codeformer.yaml). Checkpoints go to the output store; "
                                   "rerunning the same command after an interruption resumes (it prints the step). "
                                   "Without the LPIPS backbone (offline), --no-lpips trains without that term.")
    p.add_argument("-i", "--pairs", required=True, help="a pseudo-target manifest (each row's parent is its LQ input)")
    p.add_argument("--no-lpips", action="store_true",
                   help="drop the LPIPS term (lpips_weight 0: L1 + GAN only), e.g. offline without the LPIPS "
                        "backbone (bfr-curate models pull lpips_vgg16_backbone); prints a warning")
    p.add_argument("--include-failed", action="store_true",
                   help="also train on targets that failed the quality gate (default: gate == pass rows only)")
    p.add_argument("--restorer", required=True,
                   help="small or swinir (fresh networks), or a checkpoint: ours (restore/finetune output) or "
                        "any same-resolution architecture spandrel loads")
    p.add_argument("--real", default=None, help="manifest or folder of real HQ faces for the discriminator "
                                                "(image-level recipe; CodeFormer's code-level recipe has no GAN)")
    p.add_argument("-o", "--out", required=True, help="output root (local or fsspec URL)")
    p.add_argument("--config", default="auto",
                   help="catalogs/finetune/<name>.yaml or a YAML path; auto: codeformer for a CodeFormer "
                        "checkpoint, else unsupervised_bfr")
    p.add_argument("--iters", type=int, default=None, help="iterations (config default 20000)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (config default 16)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch for gradient accumulation (default 4)")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (config default 2e-5)")
    p.add_argument("--val-pairs", type=int, default=None, help="pairs held out for validation (default 16)")
    p.add_argument("--validate-every", type=int, default=None, help="validation interval in steps (default 500)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint interval in steps (default 1000)")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    add_training_dask(p)
    add_exclude(p)
    p.set_defaults(func=lambda args: cmd_finetune(args, run))

    p = sub.add_parser("restore", help="run a restorer over a manifest or folder, batched",
                       description="Restores every image with a built-in restorer, our checkpoint (e.g. a "
                                   "finetune output) or any architecture spandrel can load. A restorer whose file "
                                   "records its training resolution (finetune writes it) runs at that size: images "
                                   "of other sizes are resized in and back (rows record model_px, resized).")
    p.add_argument("-i", "--input", required=True, help="manifest or folder of images")
    p.add_argument("--restorer", required=True, help="none, bicubic, or a checkpoint path / URL")
    add_common(p, shard_size=256, batch_size=8)
    p.set_defaults(func=lambda args: cmd_restore(args, run, print_result))

    p = sub.add_parser("idm", help="train IDM's conditional diffusion restorer (x0 prediction)")
    isub = p.add_subparsers(dest="idm_command", required=True, metavar="SUBCOMMAND")
    q = isub.add_parser("train", help="train one intrinsic round on (degrade(x), x) pairs of --input",
                        description="IDM (ICCV 2023): a UNet predicting x0 from x_t and the degraded image "
                                    "(concatenated), trained with L1 on pairs degraded on the fly with the idm "
                                    "preset (IDM's ranges, GFPGAN's mechanics). Defaults are the paper's scale "
                                    "(512 px, 6 levels, ~119M parameters, 100k iterations); use --channels "
                                    "32,64,64 --attention 16 and a small --resolution on a CPU.")
    q.add_argument("-i", "--input", required=True, help="manifest or folder of HQ faces")
    q.add_argument("-o", "--out", required=True, help="output root (local or fsspec URL)")
    q.add_argument("--resolution", type=int, default=512, help="images are resized to this (default 512)")
    q.add_argument("--crop", type=int, default=None, help="random training crops of this size (default: whole image)")
    q.add_argument("--channels", default=",".join(map(str, (128, 128, 256, 256, 512, 512))),
                   help="UNet channels per level (default 128,128,256,256,512,512)")
    q.add_argument("--layers-per-block", type=int, default=2, help="ResNet blocks per level (default 2)")
    q.add_argument("--attention", default="32,16", help="resolutions (at the crop size) with self-attention")
    q.add_argument("--norm-groups", type=int, default=32, help="GroupNorm groups (default 32)")
    q.add_argument("--iters", type=int, default=100_000, help="iterations (default 100000)")
    q.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    q.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    q.add_argument("--warmup", type=int, default=10_000, help="linear warm-up steps (default 10000)")
    q.add_argument("--preset", default="idm", help="training degradation preset (default idm)")
    q.add_argument("--checkpoint-every", type=int, default=5000, help="checkpoint interval (default 5000)")
    q.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    q.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    add_training_dask(q)
    add_exclude(q)
    q.set_defaults(func=lambda args: cmd_idm_train(args, run))

    p = sub.add_parser("clean", help="clean an HQ dataset the way IDM does, judging every cleaned image",
                       description="Round r: x* = f_r(x) for every image (10-step DDPM from noise, conditioned "
                                   "on x); x* replaces x only if it passes spec §9.4's checks (thresholds in "
                                   "--acceptance): NIQE/MUSIQ not worse, the set's worst 15% by MUSIQ (NIQE "
                                   "without MUSIQ) improved and the rest nearly unchanged (LPIPS), the x1/8 copies "
                                   "within --min-lowpass-psnr and their colour (mean Lab chroma) within "
                                   "max_chroma_shift, LPIPS and FaceNet identity within their limits "
                                   "(each when its weights are pulled); otherwise x is kept, with the "
                                   "reason. The model runs at its training resolution (idm train --resolution): "
                                   "images of other sizes are resized in and back (rows record model_px, resized). "
                                   "The console says how many rows each check rejected and which checks were "
                                   "skipped for missing weights. Between rounds the next model is trained from the "
                                   "last one on (degrade(x), x*). Incremental: a rerun processes only images added "
                                   "since.")
    p.add_argument("-i", "--input", required=True, help="manifest or folder of HQ faces")
    p.add_argument("--model", required=True, help="IDM model folder (bfr-curate idm train)")
    p.add_argument("--rounds", type=int, default=1, help="extrinsic rounds (default 1)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10, the paper's)")
    p.add_argument("--variance", default="posterior", choices=VARIANCES,
                   help="reverse-step variance: posterior (default) or large (Eq. 8 as printed)")
    p.add_argument("--passes", type=int, default=1, help="apply the restorer this many times (Eq. 3; default 1)")
    p.add_argument("--degrade-source", default="original", choices=DEGRADE_SOURCES,
                   help="later rounds train on (degrade(x), x*) (original, the paper) or (degrade(x*), x*)")
    p.add_argument("--round-iters", type=int, default=50_000, help="training iterations of rounds >= 2")
    p.add_argument("--round-batch-size", type=int, default=32, help="training batch of rounds >= 2")
    p.add_argument("--acceptance", default=None,
                   help="acceptance thresholds YAML (default catalogs/acceptance/idm.yaml); "
                        "the options below override it")
    p.add_argument("--min-lowpass-psnr", type=float, default=None, help="PSNR limit of the x1/N copies in dB (30)")
    p.add_argument("--lowpass-n", type=int, default=None, help="downscale factor N of the content check (8)")
    p.add_argument("--max-lpips", type=float, default=None, help="LPIPS(x, x*) limit on the full image (0.15)")
    p.add_argument("--max-chroma-shift", type=float, default=None,
                   help="colour limit: shift of the mean (a*, b*) in Lab of the x1/N copies (3.0)")
    p.add_argument("--min-identity", type=float, default=None,
                   help="FaceNet cosine limit, when facenet_vggface2 is pulled (default: calibrated on the set as "
                        "the 1st percentile of cosine(x, JPEG_75(x)))")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it")
    add_precision(p)
    add_common(p, shard_size=64, batch_size=8, gpu_batch_from_memory=True)
    p.set_defaults(func=lambda args: cmd_clean(args, run, print_result))

    p = sub.add_parser("schedule", help="serve a recipe as a Prefect deployment on a cron or interval schedule",
                       description="Checks the recipe, the schedule, every path the recipe names and --out, then "
                                   "serves the recipe as a Prefect deployment until Ctrl-C: this process runs each "
                                   "scheduled flow run (stages cached, clean incremental: a run processes only new "
                                   "images). Without PREFECT_API_URL it starts a local Prefect server (`prefect "
                                   "server start` on 127.0.0.1, a free port), prints its UI address, writes the "
                                   "server's output to <out>/prefect-server.log (./runs/<recipe name>/ for a remote --out) "
                                   "and stops it on exit; if the server "
                                   "dies, the command ends with one line naming that log. With PREFECT_API_URL set, "
                                   "the deployment and its runs appear on that server instead.")
    p.add_argument("recipe", help="recipe YAML path or name in catalogs/recipes")
    p.add_argument("--cron", default=None, help="cron string, e.g. '0 3 * * *' (03:00 UTC every day)")
    p.add_argument("--interval", type=float, default=None, help="or: every this many seconds")
    p.add_argument("-o", "--out", default=None, help="output root (default ./runs/<recipe name>)")
    p.add_argument("--name", default=None, help="deployment name (default: the recipe's name)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--limit", type=int, default=1, help="flow runs this process executes at once (default 1)")
    p.set_defaults(func=cmd_schedule)

