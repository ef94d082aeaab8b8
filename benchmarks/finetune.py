"""Training iterations per second of the unsupervised-BFR fine-tuning step (L1 + LPIPS + GAN, D step included)
on the paper's SwinIR (15.79M parameters), fp32 against bf16 autocast + channels_last (and torch.compile
with --compile), batch 4, same process.

    python benchmarks/finetune.py [--size 512] [--iters 5] [--device auto] [--compile]

Runs :func:`bfr_models.training.finetune.finetune` itself (validation and checkpoints pushed past the
measured steps). LPIPS-VGG's backbone is random here (speed does not depend on the weights, and no
file is needed). On a CPU use a small --size: one 512-px iteration takes minutes there.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bfr_models.restorers import SwinIRRestorer  # noqa: E402
from bfr_models.training.finetune import FinetuneConfig, Pairs, finetune  # noqa: E402


def lpips_vgg():
    import lpips

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


def iterations_per_second(size: int, batch: int, iters: int, device: str, precision: str, channels_last: bool,
                          compile_model: bool) -> float:
    g = torch.Generator().manual_seed(0)
    pairs = Pairs(torch.rand(2 * batch, 3, size, size, generator=g), torch.rand(2 * batch, 3, size, size, generator=g))
    config = FinetuneConfig(iters=iters + 1, batch_size=batch, micro_batch=batch, precision=precision,
                            channels_last=channels_last, checkpoint_every=10**9, validate_every=10**9)
    torch.manual_seed(0)
    model = SwinIRRestorer()
    if compile_model:
        model = torch.compile(model)
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        finetune(model, pairs, None, pairs.target, config, out, lpips_net=lpips_vgg(), device=device,
                 on_step=lambda s, r: stamps.append(time.perf_counter()))
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])  # the first step (warm-up, compilation) is not counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image size (default 512, the paper's)")
    ap.add_argument("--batch", type=int, default=4, help="batch (default 4)")
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per mode (default 5)")
    ap.add_argument("--device", default="auto", help="cuda, cpu or auto")
    ap.add_argument("--compile", action="store_true", help="also measure bf16 + channels_last + torch.compile")
    args = ap.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, {device}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; SwinIR {args.size} px, batch {args.batch}, {args.iters} iterations")
    modes = [("fp32", "fp32", False, False), ("bf16 + channels_last", "bf16", True, False)]
    if args.compile:
        modes.append(("bf16 + channels_last + compile", "bf16", True, True))
    print("| mode | it/s | ratio vs fp32 |")
    print("|---|---|---|")
    base = None
    for label, precision, cl, comp in modes:
        speed = iterations_per_second(args.size, args.batch, args.iters, device, precision, cl, comp)
        base = base or speed
        print(f"| {label} | {speed:.3f} | {speed / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
