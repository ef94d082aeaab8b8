"""Every GPU row in one run: pseudo-target sampling with an ADM-256 prior (batch 1/8/32, fp32/bf16, and
torch.compile), IDM cleaning at 512, the GFPGAN degradation, NIQE and MUSIQ, each against the loop a user
would otherwise write, on the same machine, in one process. Prints a Markdown table headed by the GPU's name.

    python benchmarks/gpu.py                 # on a CUDA machine: about 2 minutes on an H200
    python benchmarks/gpu.py --dry-run       # every row on the CPU with tiny sizes (checks the script)

Without CUDA (and without --dry-run) it prints one line and exits 0. Rows run in order of importance and
each starts only while ``--budget-s`` seconds remain, so the table always comes back.

- ADM-256: DR2 (N=4, tau=220, 100 respaced steps: 26 network calls per image) with a randomly initialised
  prior of DR2's FFHQ-256 ADM configuration (speed does not depend on the weights). The baseline is DR2's
  own way: batch 1, fp32. fp32 rows use TF32 matmuls (bfr_models.device). ``peak GiB/img`` is the device
  memory above the model's, per image: the figure behind ``bfr_models.device.BYTES_PER_PIXEL``.
- IDM 512: the spec's 118.9M-parameter UNet, 10 steps, tasks.clean.clean_batch; baseline batch 1 fp32.
- degrade: bfr-curate's gfpgan preset on the GPU (uint8 host images in and out) against BasicSR's
  per-image functions on the CPU (benchmarks/degrade.py).
- NIQE and MUSIQ (random MUSIQ weights): ours batched on the GPU against pyiqa per image on the same GPU
  (benchmarks/score.py).
- UNet layout: one eager forward of the ADM-256 and IDM-512 UNets in channels_last against the default
  (contiguous) layout that bfr_models.device.prepare_unet keeps (images through one forward per second).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bfr_models import device as devices  # noqa: E402



@dataclass(frozen=True)
class Sizes:
    """What each row runs: the GPU run, or tiny CPU sizes for --dry-run."""

    dr2: tuple = (("N", 4), ("tau", 220), ("respace", 100))  # DR2's code: 26 network calls per image
    prior_batches: tuple[int, ...] = (1, 8, 32)
    prior_images: int = 32  # per row; batch-1 rows run fewer (prior_single)
    prior_single: int = 4
    idm_size: int = 512
    idm_batches: tuple[int, ...] = (1, 8, 16)
    idm_single: int = 2
    idm_images: int = 16
    degrade_images: int = 64
    degrade_batch: int = 32
    basicsr_images: int = 16
    score_images: int = 32
    score_batch: int = 16
    score_size: int = 512
    compile: bool = True


DRY = Sizes(dr2=(("N", 4), ("tau", 220), ("respace", 20)), prior_batches=(1, 2), prior_images=2, prior_single=1,
            idm_size=32, idm_batches=(1, 2), idm_single=1, idm_images=2, degrade_images=2, degrade_batch=2,
            basicsr_images=1, score_images=2, score_batch=2, score_size=192, compile=False)


class Table:
    """Rows printed as they come (a cut-short run still shows what it measured), within a time budget."""

    def __init__(self, budget_s: float):
        self.deadline = time.perf_counter() + budget_s
        print("| stage | what | dtype | batch | img/s | baseline | vs baseline | peak GiB/img |")
        print("|---|---|---|---:|---:|---|---:|---:|", flush=True)

    def has_time(self, name: str) -> bool:
        if time.perf_counter() < self.deadline:
            return True
        print(f"| {name} | skipped: time budget spent | | | | | | |", flush=True)
        return False

    @staticmethod
    def section(name: str, rows, *args):
        """Run one group of rows; a failure is a row of the table (the one GPU run still reports the rest)."""
        try:
            return rows(*args)
        except Exception as e:  # noqa: BLE001 - reported in the table, with its type
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} | | | | | | |",
                  flush=True)
            return None

    @staticmethod
    def row(stage, what, dtype, batch, ips, baseline_name="", baseline_ips=None, peak=None) -> None:
        ratio = f"{ips / baseline_ips:.2f}x" if baseline_ips else ""
        base = f"{baseline_name} {baseline_ips:.2f} img/s" if baseline_ips else baseline_name
        mem = f"{peak:.2f}" if peak is not None else ""
        print(f"| {stage} | {what} | {dtype} | {batch} | {ips:.2f} | {base} | {ratio} | {mem} |", flush=True)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, run, n: int, batch: int) -> tuple[float, float | None, float]:
    """``run(k)`` processes k images in batches of ``batch``. Returns (images/s over ``n`` images after a
    one-batch warm-up, peak device GiB per image above the memory held before (None off CUDA), warm-up seconds)."""
    start = time.perf_counter()
    run(batch)  # warm-up: kernels, cuDNN plans, the allocator, compilation
    _sync(dev)
    warm = time.perf_counter() - start
    held = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    run(n)
    _sync(dev)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(dev) - held) / 2**30 / batch if dev.type == "cuda" else None
    return n / seconds, peak, warm


# ------------------------------------------------------------------------------------------ rows


def random_prior(dev: torch.device, unet, resolution: int, variance: str):
    """A prior of random weights (speed and batch behaviour do not depend on the values)."""
    from bfr_models.diffusion.prior import Prior
    from bfr_models.diffusion.schedule import DDPMSchedule

    return Prior(devices.prepare_unet(unet, dev), DDPMSchedule.linear(1000), resolution, variance, "random", "random")


def small_prior(dev: torch.device, config):
    """The tests' small UNet (bfr_models.diffusion.train.small_unet) as a random prior at its resolution."""
    from bfr_models.diffusion.train import small_unet

    return random_prior(dev, small_unet(config), config.resolution, "fixed_large")


def adm_unet():
    """DR2's FFHQ-256 ADM configuration, random weights."""
    from bfr_models.diffusion.adm import ADM_ARCHS, ADMUNet2DModel, adm_unet_config

    return ADMUNet2DModel.from_config(adm_unet_config(ADM_ARCHS["ffhq256"]))


def dry_prior_config():
    """The --dry-run stand-in for the ADM prior: the tests' small UNet at 32 px."""
    from bfr_models.diffusion.train import PriorTrainConfig

    return PriorTrainConfig(resolution=32, channels=(16, 32))


def adm_prior(dev: torch.device, dry: bool):
    torch.manual_seed(0)
    if dry:
        return small_prior(dev, dry_prior_config())
    return random_prior(dev, adm_unet(), 256, "learned_range")


def batch_invariance(dev: torch.device) -> str:
    """How far an image's bytes move between sampling it alone and inside a batch of 8 on this device: DR2
    (20 respaced steps) with a small random prior at 64 px, each precision. Noise is per image either way
    (bfr_models.device); what can differ is the kernels the batch size selects."""
    from bfr_models.diffusion.train import PriorTrainConfig
    from bfr_models.pseudo_targets import generate, method_params

    torch.manual_seed(0)
    prior = small_prior(dev, PriorTrainConfig())  # 64 px
    p = method_params("dr2", N=4, tau=220, respace=20)
    x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dev)
    seeds = [[100 + i] for i in range(8)]
    parts = []
    for dtype in ("fp32", "bf16") if dev.type == "cuda" else ("fp32",):
        def png_values(images, seeds):
            out = generate(p, images, prior, seeds, dtype=devices.autocast_dtype(dtype)).images
            return (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()

        batch = png_values(x, seeds)
        alone = torch.cat([png_values(x[i : i + 1], seeds[i : i + 1]) for i in range(8)])
        diff = (batch.int() - alone.int()).abs()
        parts.append(f"{dtype}: {int((diff > 0).sum())} of {diff.numel()} uint8 values differ (max {int(diff.max())})")
    return "alone vs in a batch of 8 (DR2, small 64-px prior): " + "; ".join(parts)


def prior_rows(table: Table, dev: torch.device, sizes: Sizes, dry: bool):
    """The sampling rows; returns the --compile row to run at the end (None when out of time)."""
    from bfr_models.pseudo_targets import generate, method_params

    prior = adm_prior(dev, dry)
    p = method_params("dr2", **dict(sizes.dr2))
    name = "small 32 px (dry run)" if dry else "ADM ffhq256, DR2 26 calls"
    x = torch.rand(max(sizes.prior_images, max(sizes.prior_batches)), 3, prior.resolution, prior.resolution,
                   generator=torch.Generator().manual_seed(0))

    def run(n: int, batch: int, dtype: str, compile: bool = False):
        def images(k: int) -> None:
            for i in range(0, k, batch):
                part = x[i : min(k, i + batch)]
                generate(p, part, prior, [[i + j] for j in range(len(part))], dtype=devices.autocast_dtype(dtype),
                         compile=compile)
        return timed(dev, images, n, batch)

    dtypes = ("fp32",) if dev.type != "cuda" else ("fp32", "bf16")
    baseline = None
    for dtype in dtypes:
        for batch in sizes.prior_batches:
            if not table.has_time(f"pseudo-targets {dtype} batch {batch}"):
                return None
            ips, peak, _ = run(sizes.prior_single if batch == 1 else sizes.prior_images, batch, dtype)
            baseline = baseline or ips  # the first row: batch 1 fp32, DR2's own loop
            table.row("pseudo-targets", name, dtype, batch, ips, "batch 1 fp32", baseline, peak)
    return lambda: compiled_row(table, dev, sizes, name, run, baseline)


def compiled_row(table: Table, dev: torch.device, sizes: Sizes, name: str, run, baseline: float) -> None:
    """Batch 32 bf16 with --compile: run last, since compiling takes minutes and a slow compile must not
    crowd out the other rows."""
    if sizes.compile and dev.type == "cuda" and table.has_time("pseudo-targets bf16 --compile"):
        batch = max(sizes.prior_batches)
        ips, peak, warm = run(sizes.prior_images, batch, "bf16", compile=True)
        table.row("pseudo-targets", f"{name}, --compile (first batch {warm:.0f} s)", "bf16", batch, ips,
                  "batch 1 fp32", baseline, peak)


def idm_rows(table: Table, dev: torch.device, sizes: Sizes, dry: bool) -> None:
    from bfr_models.idm import IDMConfig, IDMModel, idm_unet
    from tasks.clean import clean_batch

    config = IDMConfig(crop=32, channels=(16, 32), layers_per_block=1, attention=(16,), norm_groups=8) if dry \
        else IDMConfig()
    torch.manual_seed(0)
    model = IDMModel(devices.prepare_unet(idm_unet(config), dev), config, "random", "random")
    s = sizes.idm_size
    x = torch.rand(max(sizes.idm_images, max(sizes.idm_batches)), 3, s, s,
                   generator=torch.Generator().manual_seed(0)).to(dev)

    def run(n: int, batch: int, dtype: str):
        def images(k: int) -> None:
            for i in range(0, k, batch):
                part = x[i : min(k, i + batch)]
                clean_batch(model, part, list(range(i, i + len(part))), 10, "posterior", 1, dtype)
        return timed(dev, images, n, batch)

    baseline = None
    for dtype in ("fp32",) if dev.type != "cuda" else ("fp32", "bf16"):
        for batch in sizes.idm_batches:
            if dev.type == "cuda" and (dtype, batch) in (("bf16", 1), ("fp32", max(sizes.idm_batches))):
                continue  # the rows that matter: batch 1 fp32 (the baseline), batch 8 fp32, batch 8 and 16 bf16
            if not table.has_time(f"clean (IDM) {dtype} batch {batch}"):
                return
            ips, peak, _ = run(sizes.idm_single if batch == 1 else sizes.idm_images, batch, dtype)
            baseline = baseline or ips
            table.row("clean (IDM)", f"{'tiny' if dry else 'spec UNet 118.9M'}, {s}px, 10 steps", dtype, batch, ips,
                      "batch 1 fp32", baseline, peak)


def degrade_rows(table: Table, dev: torch.device, sizes: Sizes) -> None:
    from benchmarks.degrade import face_images, run_basicsr, run_ours
    from bfr_models.degradations import load_preset

    if not table.has_time("degrade"):
        return
    preset = load_preset("gfpgan")
    images = face_images(sizes.degrade_images)
    theirs = sizes.basicsr_images / run_basicsr(images[: sizes.basicsr_images], preset.config)
    ours = sizes.degrade_images / run_ours(images, preset, sizes.degrade_batch, dev, extras=True)
    table.row("degrade", "gfpgan full preset, 512px, uint8 host in/out", "fp32", sizes.degrade_batch, ours,
              "BasicSR per image (CPU)", theirs)


def score_rows(table: Table, dev: torch.device, sizes: Sizes) -> None:
    from benchmarks.score import run

    if not table.has_time("NIQE, MUSIQ"):
        return
    for metric, _, theirs, ours in run(str(dev), sizes.score_images, sizes.score_batch, 1, size=sizes.score_size):
        what = "LIVE pristine model" if metric == "NIQE" else "random weights"
        table.row(metric, f"{what}, {sizes.score_size}px", "fp32" if metric == "MUSIQ" else "fp32/fp64",
                  sizes.score_batch, ours, "pyiqa per image", theirs)


def layout_rows(table: Table, dev: torch.device, dry: bool) -> None:
    """channels_last against the default layout: 5 eager UNet calls after 2 warm-ups, in each precision."""
    from bfr_models.diffusion.train import small_unet
    from bfr_models.idm import IDMConfig, idm_unet

    if dry:
        nets = [("small prior", lambda: small_unet(dry_prior_config()), 3, 32, 2)]
    else:
        nets = [("ADM ffhq256", adm_unet, 3, 256, 32), ("IDM 512", lambda: idm_unet(IDMConfig()), 6, 512, 8)]
    for name, build, channels, side, batch in nets:
        if not table.has_time(f"UNet layout {name}"):
            return
        torch.manual_seed(0)
        layout_row(table, dev, name, devices.prepare_unet(build(), dev), channels, side, batch)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def layout_row(table: Table, dev: torch.device, name: str, net, channels: int, side: int, batch: int) -> None:
    x = torch.randn(batch, channels, side, side, device=dev)
    t = torch.full((batch,), 500, device=dev, dtype=torch.long)
    for dtype in ("bf16", "fp32") if dev.type == "cuda" else ("fp32",):
        rates = {}
        for layout in (torch.contiguous_format, torch.channels_last):
            net, xi = net.to(memory_format=layout), x.contiguous(memory_format=layout)

            def calls(k: int, net=net, xi=xi, dtype=dtype) -> None:
                for _ in range(k // batch):
                    devices.run_unet(net, devices.autocast_dtype(dtype), xi, t)

            with torch.inference_mode():
                rates[layout] = timed(dev, calls, 5 * batch, batch)[0]
        table.row("UNet forward", f"{name}, channels_last", dtype, batch, rates[torch.channels_last],
                  "contiguous (default)", rates[torch.contiguous_format])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every row on the CPU with tiny sizes")
    ap.add_argument("--budget-s", type=float, default=450, help="start no row after this many seconds (default 450)")
    args = ap.parse_args(argv)
    if args.dry_run:
        dev, sizes = torch.device("cpu"), DRY
        print("# GPU benchmark, DRY RUN on the CPU (tiny sizes; the figures mean nothing)")
    elif not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here; run it on a GPU machine "
              "(or pass --dry-run to check it on the CPU)")
        return 0
    else:
        dev, sizes = devices.configure_backends(torch.device("cuda")), Sizes()
        free, total = torch.cuda.mem_get_info(dev)
        print(f"# GPU benchmark: {torch.cuda.get_device_name(dev)} ({total / 2**30:.0f} GiB, {free / 2**30:.0f} free), "
              f"torch {torch.__version__}, CUDA {torch.version.cuda}, {platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} CPU threads; TF32 on")
        auto = {f"{what} {dtype}": devices.default_batch_size(dev, side, dtype, 8)
                for what, side, dtype in (("ADM-256", 256, "bf16"), ("ADM-256", 256, "fp32"), ("IDM 512", 512, "bf16"))}
        print("default batch from free memory (bfr_models.device): " + ", ".join(f"{k} {v}" for k, v in auto.items()))
    print("command: python benchmarks/gpu.py" + (" --dry-run" if args.dry_run else ""))
    print((Table.section("batch invariance", batch_invariance, dev) or "") + "\n", flush=True)
    table = Table(args.budget_s)
    start = time.perf_counter()
    compile_row = table.section("pseudo-targets", prior_rows, table, dev, sizes, args.dry_run)
    table.section("clean (IDM)", idm_rows, table, dev, sizes, args.dry_run)
    table.section("degrade", degrade_rows, table, dev, sizes)
    table.section("NIQE, MUSIQ", score_rows, table, dev, sizes)
    table.section("UNet layout", layout_rows, table, dev, args.dry_run)
    if compile_row is not None:
        table.section("pseudo-targets --compile", compile_row)
    print(f"\n{time.perf_counter() - start:.0f} s for the rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
