"""Kernel only (tensors in memory; see benchmarks/e2e.py for the stage end to end):
images per second of NIQE and MUSIQ at 512x512: ours (batched) against pyiqa's own metrics
(one image per call, as `pyiqa` scripts score a folder), on the same images, in the same process.

    python benchmarks/score.py [--n 16] [--batch-size 8] [--device all|cpu|cuda]

NIQE: both use the LIVE pristine model (pyiqa gets it as a .mat written from our catalog copy, since
its own file would be downloaded). MUSIQ: pyiqa's architecture with the same random weights on both
sides (speed does not depend on the weights; no download). Prints a markdown table with ratios.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.degrade import face_images  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, lookup tables
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(device: str, n: int, batch_size: int, repeats: int, size: int = 512) -> list[tuple]:
    import scipy.io
    from pyiqa.archs.musiq_arch import MUSIQ as PyiqaMUSIQ
    from pyiqa.archs.niqe_arch import NIQE as PyiqaNIQE

    from bfr_models.metrics.musiq import MUSIQ, build_musiq_arch
    from bfr_models.metrics.niqe import niqe, pristine_params

    dev = torch.device(device)
    images = torch.from_numpy(face_images(n, size)).permute(0, 3, 1, 2).float().div(255).to(dev)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mu, cov = pristine_params()
        mat = Path(tmp) / "niqe_modelparameters.mat"
        scipy.io.savemat(mat, {"mu_prisparam": mu[None], "cov_prisparam": cov})
        theirs = PyiqaNIQE(pretrained_model_path=str(mat)).to(dev)

        def ours_niqe():
            for i in range(0, n, batch_size):
                niqe(images[i : i + batch_size])

        def pyiqa_niqe():
            for i in range(n):
                theirs(images[i : i + 1])

        t_ours, t_theirs = timed(ours_niqe, repeats), timed(pyiqa_niqe, repeats)
        rows.append(("NIQE", device, n / t_theirs, n / t_ours))

        torch.manual_seed(0)
        net = build_musiq_arch()
        weights = Path(tmp) / "musiq.pth"
        torch.save(net.state_dict(), weights)
        ours = MUSIQ(weights_path=weights, device=dev, batch_size=batch_size)
        baseline = PyiqaMUSIQ(pretrained=False, num_class=1).to(dev).eval()
        baseline.load_state_dict(torch.load(weights, weights_only=True))

        def pyiqa_musiq():
            with torch.inference_mode():
                for i in range(n):
                    baseline(images[i : i + 1])

        t_ours, t_theirs = timed(lambda: ours(images), repeats), timed(pyiqa_musiq, repeats)
        rows.append(("MUSIQ", device, n / t_theirs, n / t_ours))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="images (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="all", help="all (cpu, and cuda when present), cpu or cuda")
    args = p.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "all" else [args.device]
    print(f"# score benchmark, kernel only: {args.n} images 512x512, batch {args.batch_size}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| metric | device | pyiqa per image (img/s) | ours batched (img/s) | ratio |")
    print("|---|---|---:|---:|---:|")
    for device in devices:
        for metric, dev, base, ours in run(device, args.n, args.batch_size, args.repeats):
            print(f"| {metric} | {dev} | {base:.2f} | {ours:.2f} | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
