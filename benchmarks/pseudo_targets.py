"""Kernel only (tensors in memory; see benchmarks/e2e.py and null_feed.py for the stage end to end):
images per second of batched pseudo-target sampling against the same sampler one image at a time
(as DR2's and the unsupervised-BFR paper's released code run), same prior, same steps, same process.

    python benchmarks/pseudo_targets.py [--n 8] [--device all|cpu|cuda] [--methods dr2,lowfreq,difbfsr]

DifBFSR's one-at-a-time baseline is what a straightforward implementation of the paper does: one
image, its own SRM/CFM, its own sampling chain; ours stacks the B images' modules (grouped convs).

CPU: the project's small prior (``prior train``'s default UNet2DModel at 64 px, random weights:
speed does not depend on them). CUDA, when present: a randomly initialised prior of DR2's FFHQ-256
ADM configuration (converted layout, ADMUNet2DModel) at batch 1/8/32, in fp32 and bf16 autocast.
Prints a markdown table; the ratio column is batched images/s over one-at-a-time images/s.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bfr_models.diffusion.prior import Prior  # noqa: E402
from bfr_models.diffusion.schedule import DDPMSchedule  # noqa: E402
from bfr_models.pseudo_targets import generate, method_params, with_resolution  # noqa: E402

# CPU keeps the sampled steps few (respace) so the run takes minutes; both sides use the same steps.
CASES = {
    "dr2": dict(N=4, tau=220, respace=100),  # omega = 470: 25 network calls + 1
    "lowfreq": dict(N=8, K=600, L=360, respace=50),  # 31 network calls
    # LR faces of resolution / 4; per-image SRM+CFM fitted while sampling: 10 warm-up updates, 21 steps
    "difbfsr": dict(t_start=401, respace=50, warmup=10),
}


def small_prior(device) -> Prior:
    from bfr_models.diffusion.train import PriorTrainConfig, small_unet

    unet = small_unet(PriorTrainConfig()).to(device).eval()
    return Prior(unet, DDPMSchedule.linear(1000), 64, "fixed_large", "random", "random")


def adm_prior(device) -> Prior:
    from bfr_models.diffusion.adm import ADM_ARCHS, ADMUNet2DModel, adm_unet_config

    unet = ADMUNet2DModel.from_config(adm_unet_config(ADM_ARCHS["ffhq256"])).to(device).eval()
    return Prior(unet, DDPMSchedule.linear(1000), 256, "learned_range", "random", "random")


def images_per_second(prior: Prior, method: str, n: int, batch: int, dtype) -> float:
    p = with_resolution(method_params(method, **CASES[method]), prior.resolution)
    size = prior.resolution // p.upscale
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    seeds = [[i] for i in range(n)]

    def run():
        for i in range(0, n, batch):
            generate(p, x[i : i + batch], prior, seeds[i : i + batch], dtype=dtype)
        if prior.device.type == "cuda":
            torch.cuda.synchronize()

    generate(p, x[:1], prior, seeds[:1], dtype=dtype)  # warm-up
    t = time.perf_counter()
    run()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="images per measurement (CPU; CUDA uses max(n, 32))")
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    ap.add_argument("--methods", default=",".join(CASES), help="comma list of " + ",".join(CASES))
    args = ap.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"Kernel only: torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| device | prior | method | dtype | batch | batched img/s | one-at-a-time img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        if device == "cpu":
            prior, name, batches, dtypes, n = small_prior("cpu"), "small 64 px", [args.n], [("fp32", None)], args.n
        else:
            prior, name, batches, n = adm_prior("cuda"), "ADM ffhq256", [8, 32], max(args.n, 32)
            dtypes = [("fp32", None), ("bf16", torch.bfloat16)]
        for method in args.methods.split(","):
            for dname, dtype in dtypes:
                single = images_per_second(prior, method, n, 1, dtype)
                for b in batches:
                    batched = images_per_second(prior, method, n, b, dtype)
                    print(f"| {device} | {name} | {method} | {dname} | {b} | {batched:.2f} | {single:.2f} | "
                          f"{batched / single:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
