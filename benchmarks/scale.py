"""Training at growing data-set sizes: wall time, images/s and peak RSS of the whole process tree.

    python benchmarks/scale_training.py [--sizes 500,2000,8000] [--px 64] [--steps 20]

For each size it writes that many distinct synthetic 64-px faces and runs, each as its own
``bfr-curate`` process: ``prior train``, ``idm train`` and ``finetune`` (image-level recipe, small
restorer, on a hand-written pseudo-target manifest pairing a blurred copy with each face). Every stage
runs the same number of steps at every size, so images/s is steps x batch / wall time, and with
streaming data peak RSS should not grow with the size. Peak RSS is polled (every 50 ms) over the
stage's process and all its children (DataLoader workers, Prefect's server), with psutil.

These are the training stages of issue 14's scale benchmark; the other stages' rows are not here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bfr_models import storage  # noqa: E402
from bfr_models.imageio import encode_png  # noqa: E402
from bfr_models.manifest import ManifestWriter  # noqa: E402

BATCH = 4
CLI = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"


def synthetic_face(i: int, px: int) -> np.ndarray:
    """A distinct smooth image per index (an upsampled random 8x8 field)."""
    field = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(field).resize((px, px), Image.BICUBIC))


def make_data(root: Path, n: int, px: int) -> tuple[Path, str]:
    """``n`` faces in ``root/faces`` and a pseudo-target manifest of (blurred face, face) pairs."""
    faces, lq = root / "faces", root / "lq"
    faces.mkdir(parents=True)
    lq.mkdir()
    writer = ManifestWriter(storage.join(str(root), "pseudo-targets", "bench"))
    rows = []
    for i in range(n):
        rgb = synthetic_face(i, px)
        png = encode_png(rgb)
        (faces / f"f{i:05d}.png").write_bytes(png)
        blurred = np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(1.5)))
        (lq / f"f{i:05d}.png").write_bytes(encode_png(blurred))
        image_id = storage.sha256_hex(png)[:20]
        rows.append({"image_id": image_id, "uri": str(faces / f"f{i:05d}.png"), "sha256": storage.sha256_hex(png),
                     "width": px, "height": px, "parent_id": f"lq{i}", "parent_uri": str(lq / f"f{i:05d}.png"),
                     "stage": "pseudo-targets", "status": "ok"})
    writer.write_index("pseudo-targets", "bench", {}, [writer.write_shard("s0", rows)])
    return faces, writer.stage_uri


def run_stage(args: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes of the process tree) of one CLI command; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {err[-2000:]}")
    return time.perf_counter() - start, peak


def stages(faces: Path, pairs: str, out: Path, px: int, steps: int) -> dict[str, list[str]]:
    out.mkdir(parents=True, exist_ok=True)
    ft_config = out / "ft.yaml"
    ft_config.write_text(f"iters: {steps}\nbatch_size: {BATCH}\nmicro_batch: {BATCH}\nlpips_weight: 0.0\n"
                         f"d_num_feat: 8\nval_pairs: 4\nvalidate_every: {steps}\ncheckpoint_every: {steps}\n")
    common = ["--out", str(out), "--device", "cpu"]
    return {
        "prior train": ["prior", "train", "--input", str(faces), "--resolution", str(px), "--steps", str(steps),
                        "--batch-size", str(BATCH), "--channels", "8,16,16", *common],
        "idm train": ["idm", "train", "--input", str(faces), "--resolution", str(px), "--channels", "8,16",
                      "--attention", "", "--norm-groups", "8", "--layers-per-block", "1", "--iters", str(steps),
                      "--batch-size", str(BATCH), "--warmup", "0", *common],
        "finetune": ["finetune", "--pairs", pairs, "--restorer", "small", "--real", str(faces),
                     "--config", str(ft_config), *common],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,2000,8000")
    ap.add_argument("--px", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"{'stage':12} {'images':>7} {'wall s':>8} {'img/s':>8} {'peak RSS MiB':>13}")
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            faces, pairs = make_data(Path(tmp) / "data", n, args.px)
            for name, cmd in stages(faces, pairs, Path(tmp) / "out", args.px, args.steps).items():
                wall, peak = run_stage(cmd)
                print(f"{name:12} {n:7d} {wall:8.1f} {args.steps * BATCH / wall:8.2f} {peak / 2**20:13.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
