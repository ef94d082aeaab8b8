"""Every stage at growing data-set sizes, and planning at 70,000 rows: wall time, images/s and peak RSS of
the whole process tree (issue 14's scale benchmark).

    python benchmarks/scale.py [--sizes 500,2000,8000] [--px 64] [--score-px 192] [--steps 20] [--plan-rows 70000]

For each size it writes that many distinct synthetic faces and runs, each as its own ``bfr-curate`` process:
degrade (dr2 mild, scale 4), score (niqe + fid against the faces, with a seeded random-init FID Inception
installed as the ``fid_inception_pytorch`` card's file in a temporary model cache and catalog), prior train
(tiny, 32 px), pseudo-targets (dr2 with that prior, on the degraded set), idm train (tiny) and clean with it
(2 sampling steps), finetune (small restorer on the pseudo-target pairs, gate-failed ones included) and
report (over the score manifest). Training stages run the same steps at every size, so their images/s is
steps x batch / wall time; the others' is images / wall time. Score runs on a second set of the same faces
at ``--score-px`` (NIQE needs two 96-px blocks, so 192 px; below that its rows are NaN). Peak RSS is polled
every 50 ms over the stage's process and all its children (Prefect's server, DataLoader workers) with
psutil. The score process counts its reads of ``score/<key>/fid/*.npz`` (a wrapper around
``storage.read_bytes``, installed before the CLI runs): every feature file should be read once.

The planning row writes a manifest of ``--plan-rows`` rows (256-row shards, every row pointing at one of a
few real PNGs), then in one process lists it (``list_inputs``), plans 32-image shards (``make_shards``),
reads and rewrites its index and reads the whole table, and runs ``bfr-curate report`` over it in another.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bfr_models import storage  # noqa: E402
from bfr_models.imageio import encode_png  # noqa: E402
from bfr_models.manifest import ManifestWriter, read_manifest  # noqa: E402
from bfr_models.metrics import fid as F  # noqa: E402
from tests.conftest import install_models  # noqa: E402  (also gives Prefect a fresh home for the run)

BATCH = 4
CLI = "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))"
# the same CLI, recording every read of a FID feature file into $BENCH_FID_READS at exit
COUNTING_CLI = """
import atexit, json, os, sys
from bfr_models import storage
reads, read = [], storage.read_bytes
storage.read_bytes = lambda uri, *a, **k: ("/fid/" in str(uri) and reads.append(str(uri))) or read(uri, *a, **k)
atexit.register(lambda: open(os.environ["BENCH_FID_READS"], "w").write(json.dumps(reads)))
from flows.cli import main
sys.exit(main(sys.argv[1:]))
"""
PLAN = """
import json, sys, time
from bfr_models import manifest
from bfr_models.manifest import ManifestWriter, ShardInfo
from tasks.shards import list_inputs, make_shards
uri, times = sys.argv[1], {}
t = time.perf_counter(); items, _ = list_inputs(uri); times["list"] = time.perf_counter() - t
t = time.perf_counter(); shards = make_shards("score", {}, items, 32); times["plan"] = time.perf_counter() - t
t = time.perf_counter(); index = manifest.read_index(uri)
infos = [ShardInfo(**s) for s in index["shards"]]
ManifestWriter(uri).write_index(index["stage"], index["key"], index["config"], infos)
times["index"] = time.perf_counter() - t
t = time.perf_counter(); rows = manifest.read_table(uri).num_rows; times["table"] = time.perf_counter() - t
print(json.dumps({"items": len(items), "shards": len(shards), "rows": rows, "times": times}))
"""


def synthetic_face(i: int, px: int) -> np.ndarray:
    """A distinct smooth image per index (an upsampled random 8x8 field)."""
    field = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(field).resize((px, px), Image.BICUBIC))


def write_faces(folder: Path, n: int, px: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"f{i:05d}.png").write_bytes(encode_png(synthetic_face(i, px)))
    return folder


def install_inception(tmp: Path) -> None:
    """A seeded random-init FID Inception as the fid_inception_pytorch card's file, in a temporary model
    cache and catalog that the stage processes inherit through the environment."""
    torch.manual_seed(0)
    path = tmp / "inception.pth"
    torch.save(F.FIDInceptionV3().state_dict(), path)
    install_models(pytest.MonkeyPatch(), tmp, {"fid_inception_pytorch": path.read_bytes()})


def run_stage(args: list[str], code: str = CLI) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes of the process tree, stdout) of one CLI command; raises when it fails."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {err[-2000:]}")
    return time.perf_counter() - start, peak, out


def stage_uri(out: Path, stage: str) -> str:
    (index,) = (out / stage).glob("*/index.json")
    return str(index.parent)


def model_folder(out: Path, meta: str) -> str:
    (found,) = out.rglob(meta)
    return str(found.parent)


def run_size(tmp: Path, n: int, px: int, score_px: int, steps: int) -> tuple[list[tuple[str, float, float, int]], str]:
    """Rows (stage, wall s, images/s, peak RSS) of every stage at ``n`` images, and the FID read count line."""
    faces = write_faces(tmp / "faces", n, px)
    faces_score = write_faces(tmp / "faces-score", n, score_px)
    out = tmp / "out"
    common = ["--out", str(out), "--device", "cpu"]
    trained = steps * BATCH
    rows = []

    def stage(name: str, args: list[str], images: int, code: str = CLI) -> None:
        wall, peak, _ = run_stage(args, code)
        rows.append((name, wall, images / wall, peak))
        print(f"{name:15} {n:7d} {wall:8.1f} {images / wall:8.2f} {peak / 2**20:13.0f}", flush=True)

    stage("degrade", ["degrade", "--input", str(faces), "--preset", "dr2", "--split", "mild", "--scale", "4", *common],
          n)
    degraded = stage_uri(out, "degrade")
    reads_file = tmp / "fid-reads.json"
    os.environ["BENCH_FID_READS"] = str(reads_file)
    stage("score", ["score", "--input", str(faces_score), "--metrics", "niqe,fid", "--fid-ref", str(faces),
                    "--fid-convention", "legacy_pytorch", "--fid-allow-small", *common], n, COUNTING_CLI)
    scored = stage_uri(out, "score")
    reads = json.loads(reads_file.read_text())
    files = {str(p) for p in Path(scored, "fid").glob("*.npz")}
    niqe = read_manifest(scored)["niqe"].notna().sum()
    once = "each read once" if sorted(reads) == sorted(files) else "NOT each read once"
    fid_line = (f"score at {n}: NIQE on {niqe}/{n} rows; FID {len(files)} feature files, {len(reads)} reads, "
                f"{len(set(reads))} distinct ({once})")
    stage("prior train", ["prior", "train", "--input", str(faces), "--resolution", "32", "--steps", str(steps),
                          "--batch-size", str(BATCH), "--channels", "8,16", *common], trained)
    prior = model_folder(out, "prior.json")
    stage("pseudo-targets", ["pseudo-targets", "--input", degraded, "--prior", prior, "--method", "dr2",
                             "--respace", "10", *common], n)
    pairs = stage_uri(out, "pseudo-targets")
    stage("idm train", ["idm", "train", "--input", str(faces), "--resolution", str(px), "--channels", "8,16",
                        "--attention", "", "--norm-groups", "8", "--layers-per-block", "1", "--iters", str(steps),
                        "--batch-size", str(BATCH), "--warmup", "0", *common], trained)
    stage("clean", ["clean", "--input", str(faces), "--model", model_folder(out, "idm.json"), "--steps", "2",
                    *common], n)
    ft_config = tmp / "ft.yaml"
    ft_config.write_text(f"iters: {steps}\nbatch_size: {BATCH}\nmicro_batch: {BATCH}\nlpips_weight: 0.0\n"
                         f"d_num_feat: 8\nval_pairs: 4\nvalidate_every: {steps}\ncheckpoint_every: {steps}\n")
    # --include-failed: a 20-step prior's targets fail the quality gate, and the benchmark times training, not them
    stage("finetune", ["finetune", "--pairs", pairs, "--include-failed", "--restorer", "small", "--real", str(faces),
                       "--config", str(ft_config), *common], trained)
    stage("report", ["report", "--input", scored, "--out", str(tmp / "report.html")], n)
    return rows, fid_line


def write_plan_manifest(tmp: Path, n: int) -> str:
    """``n`` rows in 256-row shards, each row one of 8 real PNGs under its own id, with a NIQE score."""
    pngs = [encode_png(synthetic_face(i, 64)) for i in range(8)]
    folder = tmp / "plan-images"
    folder.mkdir()
    for i, png in enumerate(pngs):
        (folder / f"p{i}.png").write_bytes(png)
    writer, shards, rows = ManifestWriter(str(tmp / "plan" / "score" / "k70k")), [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        png = pngs[i % 8]
        rows.append({"image_id": f"{i:020d}", "uri": str(folder / f"p{i % 8}.png"), "sha256": storage.sha256_hex(png),
                     "width": 64, "height": 64, "parent_id": f"{i:020x}", "stage": "score", "status": "ok",
                     "niqe": float(rng.uniform(3, 9))})
        if len(rows) == 256 or i == n - 1:
            shards.append(writer.write_shard(f"s{len(shards):05d}", rows))
            rows = []
    writer.write_index("score", "k70k", {"metrics": ["niqe"]}, shards)
    return writer.stage_uri


def plan_row(tmp: Path, n: int) -> None:
    uri = write_plan_manifest(tmp, n)
    wall, peak, stdout = run_stage([uri], PLAN)
    result = json.loads(stdout)
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in result["times"].items())
    print(f"plan {n} rows: {result['shards']} shards planned; {steps}; process {wall:.1f} s, "
          f"peak RSS {peak / 2**20:.0f} MiB")
    rwall, rpeak, _ = run_stage(["report", "--input", uri, "--out", str(tmp / "plan-report.html")])
    print(f"report {n} rows: {rwall:.1f} s, peak RSS {rpeak / 2**20:.0f} MiB")
    total, worst = wall + rwall, max(peak, rpeak)
    print(f"planning + report at {n} rows: {total:.1f} s (goal < 60), peak RSS {worst / 2**20:.0f} MiB (goal < 2048)"
          f" -> {'met' if total < 60 and worst < 2 * 2**30 else 'NOT met'}")


def ratio_table(results: dict[int, list[tuple[str, float, float, int]]]) -> None:
    small, large = min(results), max(results)
    by_stage = {size: {r[0]: r for r in rows} for size, rows in results.items()}
    print("\n| stage | " + " | ".join(f"{s} img: s / img/s / MiB" for s in results)
          + f" | RSS {large}/{small} (<= 1.25) | img/s {large}/{small} (>= 0.8) |")
    print("|---|" + "---|" * len(results) + "---|---|")
    for name in by_stage[small]:
        cells = [f"{w:.1f} / {r:.2f} / {p / 2**20:.0f}" for _, w, r, p in (by_stage[s][name] for s in results)]
        rss = by_stage[large][name][3] / by_stage[small][name][3]
        rate = by_stage[large][name][2] / by_stage[small][name][2]
        print(f"| {name} | " + " | ".join(cells) + f" | {rss:.2f} {'ok' if rss <= 1.25 else 'MISSED'} "
              f"| {rate:.2f} {'ok' if rate >= 0.8 else 'MISSED'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="500,2000,8000", help="comma list; empty runs only the planning row")
    ap.add_argument("--px", type=int, default=64, help="face size of every stage but score (default 64)")
    ap.add_argument("--score-px", type=int, default=192, help="face size scored (NIQE needs 192; default 192)")
    ap.add_argument("--steps", type=int, default=20, help="training steps of each training stage (default 20)")
    ap.add_argument("--plan-rows", type=int, default=70000, help="rows of the planning manifest; 0 skips it")
    args = ap.parse_args()
    results, fid_lines = {}, []
    print(f"{'stage':15} {'images':>7} {'wall s':>8} {'img/s':>8} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        install_inception(Path(tmp))
        for n in (int(s) for s in args.sizes.split(",") if s):
            with tempfile.TemporaryDirectory(dir=tmp) as run:
                results[n], fid_line = run_size(Path(run), n, args.px, args.score_px, args.steps)
                fid_lines.append(fid_line)
        if args.plan_rows:
            plan_row(Path(tmp), args.plan_rows)
    if results:
        print(*fid_lines, sep="\n")
        ratio_table(results)


if __name__ == "__main__":
    main()
