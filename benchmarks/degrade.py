"""Kernel only (decoded images in memory in, arrays out; see benchmarks/e2e.py for the stage end to end):
images per second of the GFPGAN degradation at 512x512: our batched torch preset against
BasicSR's own per-image functions, on the same images, in the same process.

    python benchmarks/degrade.py [--n 64] [--batch-size 8] [--device all|cpu|cuda|mps] [--repeats 3]

The baseline is the core of GFPGAN's ``FFHQDegradationDataset.__getitem__``:
``random_mixed_kernels`` -> ``cv2.filter2D`` -> ``cv2.resize`` (INTER_LINEAR) ->
``random_add_gaussian_noise`` -> JPEG -> ``cv2.resize`` back -> 8-bit rounding, one image at a
time. Ours is ``load_preset("gfpgan")``: ``sample`` + ``apply`` per batch, from uint8 host
images to uint8 host results. "core" rows drop GFPGAN's colour extras from the sampled params
(the same work as the baseline); "full" rows keep them (colour shift 0.3, torchvision colour
jitter 0.3, gray 0.01), which the baseline leaves out.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import cv2
import numpy as np
import torch


def face_images(n: int, size: int = 512) -> np.ndarray:
    """n distinct RGB uint8 faces: random crops of scikit-image's astronaut photo, resized."""
    from skimage import data

    photo = data.astronaut()
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        side = int(rng.integers(300, 512))
        y, x = rng.integers(0, 512 - side + 1, size=2)
        out.append(cv2.resize(photo[y : y + side, x : x + side], (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def basicsr_degrade(rgb: np.ndarray, config: dict) -> np.ndarray:
    """GFPGAN's LQ synthesis with BasicSR's functions, on one RGB uint8 image."""
    from basicsr.data import degradations

    blur, jpeg_range = config["blur"], config["jpeg"]["quality"]
    img = rgb[..., ::-1].astype(np.float32) / 255.0  # GFPGAN works on BGR float32
    h, w = img.shape[:2]
    kernel = degradations.random_mixed_kernels(blur["kernel_list"], blur["kernel_prob"], blur["kernel_size"],
                                               blur["sigma"], blur["sigma"], [-math.pi, math.pi], noise_range=None)
    lq = cv2.filter2D(img, -1, kernel)
    scale = np.random.uniform(*config["downsample"]["scale"])
    lq = cv2.resize(lq, (int(w // scale), int(h // scale)), interpolation=cv2.INTER_LINEAR)
    lq = degradations.random_add_gaussian_noise(lq, config["noise"]["sigma"])
    # basicsr's random_add_jpg_compression passes np.random.uniform's float quality to
    # cv2.imencode, which OpenCV >= 4.5.4 (here 5) rejects (BasicSR #578): draw the quality
    # the same way and pass int(quality) to its add_jpg_compression.
    lq = degradations.add_jpg_compression(lq, int(np.random.uniform(*jpeg_range)))
    lq = cv2.resize(lq, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip((lq[..., ::-1] * 255.0).round(), 0, 255).astype(np.uint8)


def run_basicsr(images: np.ndarray, config: dict) -> float:
    np.random.seed(0)
    basicsr_degrade(images[0], config)  # warm-up
    start = time.perf_counter()
    for rgb in images:
        basicsr_degrade(rgb, config)
    return time.perf_counter() - start


NO_EXTRAS = {"color_shift": None, "gray": False, "color_jitter": None}


def run_ours(images: np.ndarray, preset, batch_size: int, device: torch.device, extras: bool) -> float:
    def degrade(batch: np.ndarray, first_seed: int) -> list[np.ndarray]:
        x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 255.0
        params = [preset.sample(first_seed + i) for i in range(len(batch))]
        params = params if extras else [{**p, **NO_EXTRAS} for p in params]
        outs = preset.apply(x, params)
        return [(o * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy() for o in outs]

    degrade(images[:batch_size], 10**6)  # warm-up (FFT plans, lazy imports, CUDA context)
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        degrade(images[i : i + batch_size], i)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="images to degrade per implementation (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="our batch size (default 8)")
    parser.add_argument("--device", default="all",
                        help="device for ours: cpu, cuda, mps, or all = cpu and cuda when available (default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over all implementations; each row reports its fastest round (default 3)")
    args = parser.parse_args(argv)
    from bfr_models.degradations import load_preset

    preset = load_preset("gfpgan")
    images = face_images(args.n)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]

    runs = {("BasicSR per image, core", "cpu", 1): lambda: run_basicsr(images, preset.config)}
    for d in devices:
        for extras in (False, True):
            runs[(f"bfr-curate gfpgan, {'full' if extras else 'core'}", d, args.batch_size)] = (
                lambda d=d, extras=extras: run_ours(images, preset, args.batch_size, torch.device(d), extras))
    # Rounds interleave the implementations, so a load spike on a shared machine hits all of them.
    best = {key: math.inf for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            best[key] = min(best[key], run())
    rows = [(*key, seconds) for key, seconds in best.items()]
    baseline = rows[0][3]

    gpu = f", {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""
    print(f"Kernel only: GFPGAN degradation, {args.n} images of 512x512; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), OpenCV {cv2.__version__} "
          f"({cv2.getNumThreads()} threads){gpu}; best of {args.repeats} rounds\n")
    print("| implementation | device | batch | seconds | images/s | vs BasicSR |")
    print("|---|---|---:|---:|---:|---:|")
    for name, device, batch, seconds in rows:
        print(f"| {name} | {device} | {batch} | {seconds:.2f} | {args.n / seconds:.1f} | {baseline / seconds:.2f}x |")


if __name__ == "__main__":
    main()
