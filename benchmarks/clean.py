"""Kernel only (tensors in memory; see benchmarks/e2e.py and null_feed.py for the stage end to end):
images per second of batched IDM sampling against the same sampler one image at a time, same model, same
steps (10, the paper's), same process.

    python benchmarks/clean.py [--n 16] [--batch 8] [--device all|cpu|cuda]

CPU: a small conditional UNet (channels 32,64,64, attention at 16 px) on 64-px images, random weights
(speed does not depend on them). CUDA, when present: the paper-scale network (the spec's 118.9M-parameter
DDPM UNet, 6 levels) on 512-px images, fp32 and bf16 autocast. The sampler is ``tasks.clean.clean_batch``,
which the clean stage runs. Prints a markdown table; the ratio is batched over one-at-a-time images/s.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bfr_models.idm import IDMConfig, IDMModel, idm_unet  # noqa: E402
from tasks.clean import clean_batch  # noqa: E402

SMALL = IDMConfig(crop=64, channels=(32, 64, 64), layers_per_block=1, attention=(16,), norm_groups=8)


def model_on(device: str, config: IDMConfig) -> IDMModel:
    torch.manual_seed(0)
    return IDMModel(idm_unet(config).to(device).eval(), config, "random", "random")


def images_per_second(model: IDMModel, n: int, batch: int, size: int, dtype: str, device: str) -> float:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def run():
        for i in range(0, n, batch):
            clean_batch(model, x[i:i + batch], list(range(i, min(n, i + batch))), 10, "posterior", 1, dtype)
        if device == "cuda":
            torch.cuda.synchronize()

    clean_batch(model, x[:batch], list(range(batch)), 2, "posterior", 1, dtype)  # warm-up (kernels, allocator)
    start = time.perf_counter()
    run()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="images per measurement (default 16)")
    ap.add_argument("--batch", type=int, default=8, help="batch of the batched run (default 8)")
    ap.add_argument("--device", default="all", choices=["all", "cpu", "cuda"])
    args = ap.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"Kernel only: torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| device | model | size | dtype | batch | one-at-a-time img/s | batched img/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for device in devices:
        config, size = (SMALL, 64) if device == "cpu" else (IDMConfig(), 512)
        model = model_on(device, config)
        n_params = sum(p.numel() for p in model.unet.parameters()) / 1e6
        for dtype in (["fp32"] if device == "cpu" else ["fp32", "bf16"]):
            single = images_per_second(model, args.n, 1, size, dtype, device)
            batched = images_per_second(model, args.n, args.batch, size, dtype, device)
            print(f"| {device} | {n_params:.1f}M | {size} | {dtype} | {args.batch} | {single:.2f} | {batched:.2f} "
                  f"| {batched / single:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
