"""End to end: what a user times. Each stage runs as the `bfr-curate` command (files in, PNG files + Parquet
manifest out, process start included) against the loop a user would write otherwise, also run as its own
`python` process over the same files, in the same run.

    python benchmarks/e2e.py [--n 60] [--size 256] [--stages degrade,niqe,musiq,pseudo-targets,clean] [--device cpu]
                             [--server] [--repeat 1]

Peers (one image at a time: read -> compute -> write), on the same ``--device`` as our stages, except BasicSR,
which has only CPU functions:
- degrade: BasicSR's GFPGAN functions (``benchmarks.degrade.basicsr_degrade``), ``cv2.imwrite`` per image;
  our stage runs the full gfpgan preset (with its colour extras, which the BasicSR core leaves out).
- niqe: pyiqa's NIQE (LIVE pristine model, given as a .mat: no download) per file, a CSV at the end.
- musiq: pyiqa's MUSIQ metric per file, a CSV at the end. No MUSIQ weights can be downloaded here, so both
  sides load the same random weights of pyiqa's architecture (ours through a local model card,
  :func:`bfr_models.models.write_catalog`); the cost does not depend on the values.
- pseudo-targets: a DR2-style batch-1 loop: the same prior (a small random-weight UNet, 64 px), DR2's
  defaults (N=4, tau=220, 100 respaced steps), ``generate`` per image, ``cv2.imwrite``.
- clean: a per-image IDM loop: the same small random-weight IDM network, 10 steps, ``clean_batch`` per image.
Our stages do more per image than their peers (the manifest, sha256 ids, the quality gate's or the acceptance
rules' NIQE): that work is inside our figures.

With ``--server`` each of our stages also runs against a Prefect server that outlives the command (started
once by the benchmark as a user would: ``prefect server start``, then ``PREFECT_API_URL``): the command then
skips the start of its temporary API server.

"start" is the time from launching the process to its first output file (score writes none before the end:
its start is the same command on one image). "steady img/s" counts the images after the first one over the
time after the first file. Prints a markdown table; ratios are ours / peer (end to end, img/s). This machine's
speed wanders from minute to minute (the same peer loop took 15 to 31 s on one day): ``--repeat 3`` runs ours
and the peer's in turn three times and reports the medians and each run's ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("degrade", "niqe", "musiq", "pseudo-targets", "clean")
SCORES = ("niqe", "musiq")  # score writes no file before its end


# ---------------------------------------------------------------- the peer loops (run in their own process)

def _read_rgb(path: Path):
    import cv2

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _write_rgb(path: Path, rgb) -> None:
    import cv2

    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _tensor(rgb):
    import torch

    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0


def _uint8(x):
    return (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def peer_degrade(files: list[Path], out: Path, assets: Path, device: str) -> None:  # noqa: ARG001 - CPU only
    import numpy as np

    from benchmarks.degrade import basicsr_degrade

    config = json.loads((assets / "gfpgan.json").read_text())
    np.random.seed(0)
    for f in files:
        _write_rgb(out / f.name, basicsr_degrade(_read_rgb(f), config))


def peer_niqe(files: list[Path], out: Path, assets: Path, device: str) -> None:
    import csv

    import torch
    from pyiqa.archs.niqe_arch import NIQE

    metric = NIQE(pretrained_model_path=str(assets / "niqe_modelparameters.mat")).to(device)
    with torch.inference_mode(), open(out / "niqe.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for f in files:
            w.writerow([f.name, float(metric(_tensor(_read_rgb(f)).to(device)))])


def peer_musiq(files: list[Path], out: Path, assets: Path, device: str) -> None:
    import csv

    import pyiqa
    import torch

    metric = pyiqa.create_metric("musiq", pretrained_model_path=str(assets / "musiq.pth"), device=device)
    with torch.inference_mode(), open(out / "musiq.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        for f in files:
            w.writerow([f.name, float(metric(_tensor(_read_rgb(f)).to(device)))])


def peer_pseudo_targets(files: list[Path], out: Path, assets: Path, device: str) -> None:
    import torch

    from bfr_models.diffusion.prior import load_prior
    from bfr_models.pseudo_targets import generate, method_params, with_resolution

    prior = load_prior(str(assets / "prior"), device)
    p = with_resolution(method_params("dr2"), prior.resolution)
    with torch.inference_mode():
        for seed, f in enumerate(files):
            result = generate(p, _tensor(_read_rgb(f)).to(device), prior, [[seed]])
            _write_rgb(out / f.name, _uint8(result.images.cpu()))


def peer_clean(files: list[Path], out: Path, assets: Path, device: str) -> None:
    import torch

    from bfr_models.idm import load_idm
    from tasks.clean import clean_batch

    model = load_idm(str(assets / "idm"), device)
    with torch.inference_mode():
        for seed, f in enumerate(files):
            x = _tensor(_read_rgb(f)).to(device)
            _write_rgb(out / f.name, _uint8(clean_batch(model, x, [seed], 10, "posterior", 1).cpu()))


PEERS = {"degrade": peer_degrade, "niqe": peer_niqe, "musiq": peer_musiq, "pseudo-targets": peer_pseudo_targets,
         "clean": peer_clean}
PEER_NAMES = {"degrade": "BasicSR per image, cv2.imwrite", "niqe": "pyiqa NIQE per image, CSV",
              "musiq": "pyiqa MUSIQ per image, CSV",
              "pseudo-targets": "DR2-style loop, batch 1", "clean": "IDM loop, one image at a time"}


# ---------------------------------------------------------------- setup and timing

def prepare(root: Path, n: int, size: int, stages: list[str]) -> Path:
    """The input faces, the assets the peers need and the small random-weight models both sides use."""
    import cv2
    import scipy.io
    import torch

    from benchmarks.clean import SMALL
    from benchmarks.degrade import face_images
    from bfr_models.degradations import load_preset
    from bfr_models.diffusion.prior import save_prior
    from bfr_models.diffusion.train import PriorTrainConfig, small_unet
    from bfr_models.idm import idm_unet, save_idm
    from bfr_models.metrics.niqe import pristine_params

    faces = root / "faces"
    faces.mkdir()
    for i, rgb in enumerate(face_images(n, size)):
        cv2.imwrite(str(faces / f"face_{i:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assets = root / "assets"
    assets.mkdir()
    (assets / "gfpgan.json").write_text(json.dumps(load_preset("gfpgan").config))
    mu, cov = pristine_params()
    scipy.io.savemat(assets / "niqe_modelparameters.mat", {"mu_prisparam": mu[None], "cov_prisparam": cov})
    torch.manual_seed(0)
    save_prior(small_unet(PriorTrainConfig()), str(assets / "prior"), variance_type="fixed_large")
    save_idm(idm_unet(SMALL), SMALL, str(assets / "idm"))
    if "musiq" in stages:
        import io

        from bfr_models.metrics.musiq import build_musiq_arch
        from bfr_models.models import write_catalog

        buf = io.BytesIO()
        torch.save(build_musiq_arch().state_dict(), buf)  # pyiqa's architecture, seeded random weights
        (assets / "musiq.pth").write_bytes(buf.getvalue())
        env = write_catalog({"musiq_koniq": buf.getvalue()}, assets / "model-cache", assets / "catalogs")
        (assets / "env.json").write_text(json.dumps(env))
    return faces


def bfr_curate() -> list[str]:
    script = Path(sys.executable).parent / "bfr-curate"  # what a user types
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def our_command(stage: str, faces: Path, out: Path, assets: Path, device: str) -> list[str]:
    common = ["--input", str(faces), "--out", str(out), "--device", device]
    return bfr_curate() + {
        "degrade": ["degrade", "--preset", "gfpgan"],
        "niqe": ["score", "--metrics", "niqe"],
        "musiq": ["score", "--metrics", "musiq"],
        "pseudo-targets": ["pseudo-targets", "--prior", str(assets / "prior")],
        "clean": ["clean", "--model", str(assets / "idm")],
    }[stage] + common


def timed(cmd: list[str], out: Path, watch: str = "*.png", env: dict | None = None) -> tuple[float, float | None]:
    """(seconds the process took, seconds until its first output file appeared)."""
    out.mkdir(parents=True, exist_ok=True)
    first: list[float] = []
    done = threading.Event()
    start = time.perf_counter()

    def poll():
        while not done.is_set():
            if next(out.rglob(watch), None) is not None:
                first.append(time.perf_counter() - start)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    total = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return total, (first[0] if first else None)


def measure_ours(stage: str, faces: Path, root: Path, assets: Path, device: str, env: dict | None = None,
                 label: str = "") -> tuple[float, float | None]:
    """(total, start) of our command; ``env``: e.g. the PREFECT_API_URL of a running server."""
    name = f"{stage}{label}"
    total, first = timed(our_command(stage, faces, root / "ours" / name, assets, device), root / "ours" / name,
                         env=env)
    if stage in SCORES:  # writes no file before the end: its start is the same command on one image
        one = root / "one"
        if not one.exists():
            one.mkdir()
            first_face = sorted(faces.iterdir())[0]
            (one / first_face.name).write_bytes(first_face.read_bytes())
        first, _ = timed(our_command(stage, one, root / "ours-one" / name, assets, device), root / "ours-one",
                         env=env)
    return total, first


def measure_once(stage: str, faces: Path, root: Path, assets: Path, device: str, n: int,
                 server_url: str | None = None, label: str = "") -> dict:
    """One run of our command (and, with ``server_url``, one against the running server) and one of the peer's
    loop, each into its own fresh folder (``label`` tells repeats apart: a second run into a folder would be
    a cached rerun)."""
    # the local model card of the random-weight MUSIQ, for the musiq stage only: with MUSIQ pulled, clean's
    # acceptance and the pseudo-target gate would score with it too, work their peers' loops do not do
    env_file = assets / "env.json"
    env = json.loads(env_file.read_text()) if stage == "musiq" and env_file.exists() else {}
    ours_total, ours_first = measure_ours(stage, faces, root, assets, device, env, label)
    peer_out = root / "peer" / f"{stage}{label}"
    peer_total, peer_first = timed([sys.executable, __file__, "--peer", stage, "--input", str(faces),
                                    "--out", str(peer_out), "--assets", str(assets), "--device", device], peer_out,
                                   "*.csv" if stage in SCORES else "*.png")
    if stage in SCORES:
        peer_first = None  # its CSV is written from the first row on
    row = dict(stage=stage, n=n, ours_total=ours_total, ours_start=ours_first, peer_total=peer_total,
               peer_start=peer_first)
    if server_url:
        row["server_total"], row["server_start"] = measure_ours(stage, faces, root, assets, device,
                                                                {**env, "PREFECT_API_URL": server_url},
                                                                f"-server{label}")
    return row


def measure(stage: str, faces: Path, root: Path, assets: Path, device: str, n: int,
            server_url: str | None = None, repeat: int = 1) -> dict:
    """``repeat`` rounds of :func:`measure_once`, ours and the peer's in turn (a busy spell of the machine then
    slows both sides, not one): each figure is the median over the rounds, and ``ratios`` keeps every round's
    ratio of ours (temporary API server) to the peer's."""
    runs = [measure_once(stage, faces, root, assets, device, n, server_url, f"-{r}" if repeat > 1 else "")
            for r in range(repeat)]
    row = dict(stage=stage, n=n, repeat=repeat, ratios=[r["peer_total"] / r["ours_total"] for r in runs])
    if server_url:
        row["server_ratios"] = [r["peer_total"] / r["server_total"] for r in runs]
    for key in runs[0].keys() - {"stage", "n"}:
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    return row


@contextmanager
def running_server(root: Path):
    """A Prefect API server that outlives our commands, as `prefect server start` gives a user (its own
    PREFECT_HOME); yields its PREFECT_API_URL."""
    from flows.api_server import end_process, free_port, wait_healthy

    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-server-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = Path(sys.executable).parent / "prefect"
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        if not wait_healthy(url, proc, 180):
            raise SystemExit("the Prefect server did not start")
        time.sleep(5)  # let its services finish their first loop
        yield url
    finally:
        end_process(proc, 10)


def steady(total: float, first: float | None, n: int) -> str:
    if first is None or n < 2 or total <= first:
        return "-"
    return f"{(n - 1) / (total - first):.1f}"


def print_table(rows: list[dict], args) -> None:
    import cv2
    import torch

    runs = "one run" if args.repeat == 1 else f"median of {args.repeat} runs, ours and the peer's in turn"
    print(f"\nEnd to end, {args.n} faces {args.size}x{args.size} PNG, device {args.device}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"OpenCV {cv2.__version__}; {runs}\n")
    rounds = args.repeat > 1
    print("| stage | Prefect API | ours: command total s | ours: start s | ours img/s | ours steady img/s | "
          "peer loop | peer total s | peer img/s | peer steady img/s | ratio (img/s) |"
          + (" ratio of each run |" if rounds else ""))
    print("|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|" + ("---|" if rounds else ""))
    for r in rows:
        n, peer = r["n"], r["n"] / r["peer_total"]
        variants = [("temporary (default)", r["ours_total"], r["ours_start"], r["ratios"])]
        if "server_total" in r:
            variants.append(("server running", r["server_total"], r["server_start"], r["server_ratios"]))
        for api, total, first, ratios in variants:
            start = f"{first:.1f}" if first is not None else "-"
            ours_steady = steady(total, first, n) if r["stage"] not in SCORES else "-"
            each = (" " + ", ".join(f"{x:.2f}" for x in ratios) + " |") if rounds else ""
            print(f"| {r['stage']} | {api} | {total:.1f} | {start} | {n / total:.1f} | {ours_steady} | "
                  f"{PEER_NAMES[r['stage']]} | {r['peer_total']:.1f} | {peer:.1f} | "
                  f"{steady(r['peer_total'], r['peer_start'], n)} | {statistics.median(ratios):.2f}x |{each}",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60, help="faces (default 60)")
    ap.add_argument("--size", type=int, default=256, help="face size in pixels (default 256)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    ap.add_argument("--device", default="cpu", help="our stages' --device, and the peers' (BasicSR: CPU only)")
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each side this many times, in turn, and report medians (default 1)")
    ap.add_argument("--server", action="store_true",
                    help="also run our stages against a running Prefect server (prefect server start)")
    ap.add_argument("--peer", choices=STAGES, help=argparse.SUPPRESS)  # run one peer loop (a child process)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--assets", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.peer:
        PEERS[args.peer](sorted(Path(args.input).glob("*.png")), Path(args.out), Path(args.assets), args.device)
        return
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        faces = prepare(root, args.n, args.size, stages)
        rows = []
        with (running_server(root) if args.server else nullcontext()) as server_url:
            for stage in stages:
                rows.append(measure(stage, faces, root, root / "assets", args.device, args.n, server_url,
                                     args.repeat))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        print_table(rows, args)


if __name__ == "__main__":
    main()
