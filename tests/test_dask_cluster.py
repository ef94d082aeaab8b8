"""A recipe on a real multi-node Dask cluster, simulated on this machine with separate OS processes.

One Prefect server (its own PREFECT_HOME), a `dask scheduler`, two `dask worker` processes (two "nodes": their own
working directory, HOME and temp folder) and moto's S3 server holding the inputs, the outputs, the prior and the
shared model cache. The command line runs as its own process too, from a working directory of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from tests.conftest import BIN, REPO, _free_port, face_like

BUCKET = "bfr-cluster"
N_PHOTOS = 6
KILL_PHOTOS = 10
RECIPE = {"name": "cluster", "photos": f"s3://{BUCKET}/photos", "score_degraded": False,
          "degrade": {"preset": "dr2", "split": "mild", "scale": 4, "shard_size": 1},
          "pseudo_targets": {"method": "dr2", "respace": 10, "shard_size": 1, "prior": f"s3://{BUCKET}/prior"},
          "score": {"metrics": "psnr,ssim,lpips", "lpips_net": "alex", "shard_size": 2},
          "report": {"title": "cluster"}}


def _wait(what: str, ready, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not start in {timeout:.0f} s")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _lpips_backbone() -> bytes:
    """A small stand-in for the AlexNet LPIPS backbone: torchvision's own random initialisation, features only."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    state = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _write_catalog(root: Path, backbone: bytes) -> Path:
    """The real catalogs, with the LPIPS AlexNet card pinned to the test backbone's sha256."""
    catalog = root / "catalogs"
    (catalog / "models").mkdir(parents=True)
    for other in (REPO / "catalogs").iterdir():
        if other.is_dir() and other.name != "models":
            (catalog / other.name).symlink_to(other)
    for card in (REPO / "catalogs" / "models").glob("*.yaml"):
        fields = yaml.safe_load(card.read_text())
        if fields["name"] == "lpips_alex_backbone":
            fields["sha256"] = hashlib.sha256(backbone).hexdigest()
        (catalog / "models" / card.name).write_text(yaml.safe_dump(fields))
    return catalog


@pytest.fixture(scope="module")
def cluster(s3_endpoint, tmp_path_factory):
    """Prefect server, Dask scheduler and two workers as separate processes; S3 holding photos, prior, models."""
    import s3fs

    from bfr_models.diffusion.prior import save_prior
    from bfr_models.diffusion.train import PriorTrainConfig, small_unet
    from bfr_models.imageio import encode_png

    root = tmp_path_factory.mktemp("cluster")
    backbone = _lpips_backbone()
    catalog = _write_catalog(root, backbone)
    api_port, scheduler_port = _free_port(), _free_port()
    api = f"http://127.0.0.1:{api_port}/api"
    scheduler = f"tcp://127.0.0.1:{scheduler_port}"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BFR_CURATE_"))}
    shared = {**base, "PREFECT_API_URL": api, "BFR_CURATE_MODEL_CACHE": f"s3://{BUCKET}/models",
              "BFR_CURATE_CATALOGS": str(catalog), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
              "PREFECT_LOGGING_LEVEL": "WARNING", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    procs = []

    def node(name: str) -> dict:
        """A simulated machine: its own working directory, HOME and temp folder (Prefect's local state in it)."""
        folders = {k: root / name / k for k in ("cwd", "home", "tmp")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        env = {**shared, "HOME": str(folders["home"]), "TMPDIR": str(folders["tmp"]),
               "PREFECT_HOME": str(folders["tmp"] / "prefect")}
        return {"env": env, **folders}

    def start(args: list[str], where: dict, log: str) -> subprocess.Popen:
        out = open(where["tmp"] / log, "wb")
        proc = subprocess.Popen(args, cwd=where["cwd"], env=where["env"], stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        server_node = node("server")
        server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(api_port),
                        "--no-services"], server_node, "server.log")
        sched = start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(scheduler_port),
                       "--no-dashboard"], node("scheduler"), "scheduler.log")
        nodes = [node("node-a"), node("node-b")]
        # node-a advertises a GPU (as `dask worker --resources GPU=1` on a GPU machine); it has none: a stage
        # with --device auto must go there only and resolve `auto` there (to cpu)
        workers = [start([str(BIN / "dask"), "worker", scheduler, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                          "--name", f"node-{k}", "--local-directory", str(n["tmp"] / "dask"),
                          *(["--resources", "GPU=1"] if k == 0 else [])], n, "worker.log")
                   for k, n in enumerate(nodes)]
        # while they start: the photos, a tiny prior (random weights: its targets are valid images) and the
        # LPIPS backbone in the shared model cache, all on S3
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        for i in range(KILL_PHOTOS):
            png = encode_png(face_like(i, size=64))
            fs.pipe(f"{BUCKET}/more/face_{i}.png", png)
            if i < N_PHOTOS:
                fs.pipe(f"{BUCKET}/photos/face_{i}.png", png)
        save_prior(small_unet(PriorTrainConfig(resolution=32, channels=(16, 32))), f"s3://{BUCKET}/prior",
                   variance_type="fixed_large")
        card = yaml.safe_load((catalog / "models" / "lpips_alex_backbone.yaml").read_text())
        fs.pipe(f"{BUCKET}/models/{card['filename']}", backbone)
        _wait("prefect server", lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, server, 180)
        from distributed import Client

        with Client(scheduler, timeout=60) as client:
            _wait("dask workers", lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, sched)
        driver = node("driver")
        recipe = root / "driver-recipe.yaml"  # read by the command only (the test's own temp folder)
        recipe.write_text(yaml.safe_dump(RECIPE))
        yield {"root": root, "fs": fs, "scheduler": scheduler, "driver": driver, "nodes": nodes, "workers": workers,
               "recipe": recipe}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _run(cluster, out: str) -> subprocess.CompletedProcess:
    driver = cluster["driver"]
    return subprocess.run([str(BIN / "bfr-curate"), "run", str(cluster["recipe"]), "--out", out, "--dask",
                           cluster["scheduler"], "--device", "cpu"], cwd=driver["cwd"], env=driver["env"],
                          capture_output=True, text=True, timeout=400)


def _objects(fs, prefix: str) -> dict[str, str]:
    """Shard and image objects under ``prefix`` with their ETag and modification time (a rewrite changes them)."""
    fs.invalidate_cache()
    return {key: f"{info['ETag']} {info['LastModified']}" for key, info in fs.find(prefix, detail=True).items()
            if key.endswith((".parquet", ".png"))}


def _manifests(fs, out: str):
    from bfr_models import manifest

    fs.invalidate_cache()
    stages = {}
    for index in fs.glob(f"{out.removeprefix('s3://')}/*/*/index.json"):
        uri = "s3://" + index.rsplit("/", 1)[0]
        stages[manifest.read_index(uri)["stage"]] = manifest.read_manifest(uri)
    return stages


def test_recipe_on_two_workers_to_s3_rerun_cached_and_survives_a_killed_worker(cluster):
    fs, out = cluster["fs"], f"s3://{BUCKET}/run"
    done = _run(cluster, out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {out}/report.html" in done.stdout
    stages = _manifests(fs, out)
    assert {"degrade", "pseudo-targets", "score"} <= set(stages)
    pids = {str(w.pid) for w in cluster["workers"]}
    made_by = set()
    for name, df in stages.items():
        assert len(df) == N_PHOTOS and (df["status"] == "ok").all(), name
        assert (df["device"] == "cpu").all() and df["worker"].notna().all()
        made_by |= {w.rsplit(":", 1)[1] for w in df["worker"]}
    assert made_by == pids  # rows made on both nodes, by the worker processes, none by the command itself
    assert stages["score"]["lpips"].notna().all()  # the LPIPS backbone came from the shared model cache
    for n in cluster["nodes"]:  # each node pulled it into its own temp folder, checked against the card
        assert any(p.name.endswith(".pth") for p in (n["tmp"]).glob("bfr-curate-models-*/*"))
    # nothing written on any machine outside its temp folder
    for where in (cluster["driver"], *cluster["nodes"]):
        assert _files(where["cwd"]) == [] and _files(where["home"]) == []

    before = _objects(fs, f"{BUCKET}/run")
    again = _run(cluster, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _objects(fs, f"{BUCKET}/run") == before  # every shard a cache hit: nothing rewritten

    # a stage that may use a GPU asks for one: every shard on the node advertising it, `auto` resolved there
    driver = cluster["driver"]
    gpu = subprocess.run([str(BIN / "bfr-curate"), "degrade", "--input", f"s3://{BUCKET}/photos", "--out",
                          f"s3://{BUCKET}/gpu", "--preset", "gfpgan", "--shard-size", "1",
                          "--dask", cluster["scheduler"]],
                         cwd=driver["cwd"], env=driver["env"], capture_output=True, text=True, timeout=400)
    assert gpu.returncode == 0, gpu.stderr[-3000:]
    rows = _manifests(fs, f"s3://{BUCKET}/gpu")["degrade"]
    assert len(rows) == N_PHOTOS and set(rows["worker"].str.rsplit(":", n=1).str[1]) == {str(cluster["workers"][0].pid)}
    assert set(rows["device"]) == {"cpu"}

    # training is one task on a worker: the GPU one, its images read from S3, the prior written there
    trained = subprocess.run([str(BIN / "bfr-curate"), "prior", "train", "--input", f"s3://{BUCKET}/photos",
                              "--out", f"s3://{BUCKET}/trained", "--resolution", "32", "--steps", "4",
                              "--batch-size", "2", "--channels", "16,32", "--checkpoint-every", "2",
                              "--dask", cluster["scheduler"]],
                             cwd=driver["cwd"], env=driver["env"], capture_output=True, text=True, timeout=400)
    assert trained.returncode == 0, trained.stderr[-3000:]
    fs.invalidate_cache()
    (prior_json,) = fs.glob(f"{BUCKET}/trained/prior/*/prior.json")
    source = json.loads(fs.cat(prior_json))["source"]
    assert source["worker"].rsplit(":", 1)[1] == str(cluster["workers"][0].pid) and source["device"] == "cpu"
    for where in (driver, *cluster["nodes"]):
        assert _files(where["cwd"]) == [] and _files(where["home"]) == []

    # a node dies while the pseudo-targets stage runs: the other finishes its shards, each input exactly once
    recipe = cluster["root"] / "kill-recipe.yaml"
    short = {k: v for k, v in RECIPE.items() if k not in ("score", "report")}  # the stages that matter here
    recipe.write_text(yaml.safe_dump({**short, "photos": f"s3://{BUCKET}/more"}))
    out2 = f"s3://{BUCKET}/run2"
    proc = subprocess.Popen([str(BIN / "bfr-curate"), "run", str(recipe), "--out", out2, "--dask",
                             cluster["scheduler"], "--device", "cpu"], cwd=driver["cwd"], env=driver["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = cluster["workers"][1]
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if fs.glob(f"{BUCKET}/run2/pseudo-targets/*/shards/*.parquet"):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=400)
    assert victim.poll() is not None, "the run ended before a node could be killed"
    assert proc.returncode == 0, stderr[-3000:]
    targets = _manifests(fs, out2)["pseudo-targets"]
    degraded = _manifests(fs, out2)["degrade"]
    assert len(targets) == KILL_PHOTOS and (targets["status"] == "ok").all()
    assert sorted(targets["parent_id"]) == sorted(degraded["image_id"])  # every input exactly once
    assert "pseudo-targets: 10 rows (10 ok, 0 error)" in stdout


def test_a_local_path_with_a_remote_cluster_fails_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "photos"
    photos.mkdir()
    code = main(["degrade", "--input", str(photos), "--out", "s3://nowhere/run", "--preset", "gfpgan",
                 "--dask", "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{photos} is a path on this machine" in err and "s3://" in err
    # a training command too: its one task would run on a worker that cannot read this folder
    code = main(["prior", "train", "--input", str(photos), "--out", "s3://nowhere/run", "--device", "cpu",
                 "--dask", "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{photos} is a path on this machine" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # nothing written
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["run", "demo", "--out", "s3://nowhere/run", "--dask", "tcp://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "PREFECT_API_URL is not set" in err


def test_shared_model_cache_is_pulled_hash_checked(s3_endpoint, tmp_path, monkeypatch):
    import tempfile

    import s3fs

    from bfr_models import models

    good, bad = b"the weights", b"other bytes"
    catalog = tmp_path / "catalogs"
    (catalog / "models").mkdir(parents=True)
    card = yaml.safe_load((REPO / "catalogs" / "models" / "lpips_alex_backbone.yaml").read_text())
    (catalog / "models" / "lpips_alex_backbone.yaml").write_text(
        yaml.safe_dump({**card, "sha256": hashlib.sha256(good).hexdigest()}))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("bfr-shared-cache")
    monkeypatch.setenv("BFR_CURATE_CATALOGS", str(catalog))
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", "s3://bfr-shared-cache/models")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    with pytest.raises(models.ModelMissingError, match="looked in s3://bfr-shared-cache/models"):
        models.model_path("lpips_alex_backbone")
    fs.pipe(f"bfr-shared-cache/models/{card['filename']}", bad)
    with pytest.raises(models.ModelHashError, match="the shared model cache holds a wrong file"):
        models.model_path("lpips_alex_backbone")
    assert _files(tmp_path / "node-tmp") == []  # nothing kept of a wrong file
    fs.pipe(f"bfr-shared-cache/models/{card['filename']}", good)
    path = models.model_path("lpips_alex_backbone")
    assert path.read_bytes() == good and path.is_relative_to(tmp_path / "node-tmp")
