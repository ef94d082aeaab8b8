"""Fault injection on the output store, through the real CLI in a subprocess: a moto S3 server killed or
paused mid-run, a SIGKILLed and a SIGTERMed run, a typo bucket, an unwritable --out, two runs at once.

Each asserts a bounded exit, one line on stderr, nothing partial visible, and after a rerun every input once.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import BIN, REPO, face_like, write_png

N_IMAGES, SHARD = 40, 4
EXIT_BOUND = 60  # seconds from the fault to the exit (the bound)
FAST = {"BFR_CURATE_STORE_TIMEOUT": "3", "BFR_CURATE_STORE_ATTEMPTS": "2", "BFR_CURATE_STORE_GRACE": "10"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Moto:
    """A moto server of our own (this module kills and pauses it)."""

    def __init__(self):
        self.port = _free_port()
        self.proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.env["AWS_ENDPOINT_URL"], key="testing", secret="testing",
                                 skip_instance_cache=True, use_listings_cache=False)

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def moto(monkeypatch):
    import s3fs

    server = Moto()
    for k, v in server.env.items():  # this process reads the results back through bfr_models.storage
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faces")
    for i in range(N_IMAGES):
        write_png(folder / f"face_{i:02d}.png", face_like(i, size=32))
    return folder


def start(faces: Path, out: str, tmp_path: Path, env: dict | None = None, workers: int = 2) -> subprocess.Popen:
    """`bfr-curate degrade` in its own process group (own Prefect home, so runs never share a database)."""
    home = tmp_path / f"prefect-{time.monotonic_ns()}"
    (tmp_path / "tmp").mkdir(exist_ok=True)  # what a killed command leaves in its temporary folder stays here
    full = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(home), "TMPDIR": str(tmp_path / "tmp"),
            **FAST, **(env or {})}
    cmd = [str(BIN / "bfr-curate"), "degrade", "--input", str(faces), "--out", out, "--preset", "gfpgan",
           "--shard-size", str(SHARD), "--workers", str(workers), "--device", "cpu"]
    return subprocess.Popen(cmd, cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = EXIT_BOUND) -> tuple[int, str, str, float]:
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its Prefect server too
        raise
    return proc.returncode, out, err, time.monotonic() - t0


def one_line(err: str) -> str:
    """stderr is one line (the progress bar's carriage-return lines aside), no traceback."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "img/s" not in ln
             and "it/s" not in ln and not ln.lstrip().startswith("degrade:")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def wait_for_shard(list_files, timeout: float = 240) -> None:
    """Until the first shard file is visible: the fault then hits mid-run."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(f.endswith(".parquet") and "/shards/" in f for f in list_files()):
            return
        time.sleep(0.2)
    raise AssertionError("no shard was written")


def assert_nothing_partial(fs, root: str) -> None:
    """Every visible shard and image reads whole; an index lists only shards that exist."""
    files = fs.find(root)
    for f in files:
        name = f.rsplit("/", 1)[-1]
        if "/shards/" in f and name.endswith(".parquet") and not name.startswith("."):
            pq.read_table(io.BytesIO(fs.cat_file(f)))
        elif "/images/" in f and name.endswith(".png") and not name.startswith("."):
            Image.open(io.BytesIO(fs.cat_file(f))).load()
        elif name == "index.json":
            stage = f.rsplit("/", 1)[0]
            for shard in json.loads(fs.cat_file(f))["shards"]:
                assert not shard["path"].endswith(".tmp") and fs.exists(f"{stage}/{shard['path']}")


def assert_every_input_once(out: str) -> None:
    from bfr_models import manifest, storage

    fs, root = storage.filesystem(out)
    stages = [p.rsplit("/", 1)[0] for p in fs.find(root) if p.endswith("/index.json")]
    assert len(stages) == 1, stages
    df = manifest.read_manifest(storage._to_uri(fs, stages[0]))
    assert len(df) == N_IMAGES and df["parent_uri"].nunique() == N_IMAGES and df["image_id"].is_unique
    assert (df["status"] == "ok").all()


def test_endpoint_killed_mid_run(moto, faces, tmp_path):
    fs = moto.fs()
    fs.mkdir("killed")
    proc = start(faces, "s3://killed/run", tmp_path, moto.env)
    wait_for_shard(lambda: fs.find("killed"))
    moto.proc.kill()
    rc, _, err, took = finish(proc)
    line = one_line(err)
    assert rc == 1 and took < EXIT_BOUND
    assert "s3://killed" in line and "testing" not in line, line
    print(f"FIGURE killed endpoint: exit {took:.1f} s after the kill")


def test_endpoint_paused_mid_run_then_rerun(moto, faces, tmp_path):
    fs = moto.fs()
    fs.mkdir("paused")
    proc = start(faces, "s3://paused/run", tmp_path, moto.env)
    wait_for_shard(lambda: fs.find("paused"))
    os.kill(moto.proc.pid, signal.SIGSTOP)  # connections hang, as behind a hung load balancer
    try:
        rc, _, err, took = finish(proc)
    finally:
        os.kill(moto.proc.pid, signal.SIGCONT)
    line = one_line(err)
    assert rc == 1 and took < EXIT_BOUND and "s3://paused" in line and "rerun" in line, line
    print(f"FIGURE paused endpoint: exit {took:.1f} s after the pause")
    assert_nothing_partial(fs, "paused")
    assert not [f for f in fs.find("paused") if ".bfr-curate-probe-" in f]
    rc, _, err, _ = finish(start(faces, "s3://paused/run", tmp_path, moto.env), timeout=300)
    assert rc == 0, err[-3000:]
    assert_every_input_once("s3://paused/run")


def test_killed_cli_then_rerun(faces, tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    out = tmp_path / "out"
    proc = start(faces, str(out), tmp_path)
    wait_for_shard(lambda: [str(p) for p in out.rglob("*.parquet")])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert_nothing_partial(LocalFileSystem(), str(out))
    assert list(out.rglob(".bfr-curate-lease.json")), "the killed run's lease stays behind"
    rc, _, err, _ = finish(start(faces, str(out), tmp_path), timeout=300)  # the dead owner's lease is taken over
    assert rc == 0, err[-3000:]
    assert_every_input_once(str(out))
    assert not list(out.rglob(".bfr-curate-lease.json")), "released at the end"


def test_sigterm_stops_promptly(faces, tmp_path):
    from fsspec.implementations.local import LocalFileSystem

    out = tmp_path / "out"
    proc = start(faces, str(out), tmp_path, {"BFR_CURATE_STOP_GRACE": "5"}, workers=1)
    wait_for_shard(lambda: [str(p) for p in out.rglob("*.parquet")])
    os.kill(proc.pid, signal.SIGTERM)
    rc, _, err, took = finish(proc, timeout=30)
    line = one_line(err)
    assert rc == 1 and "SIGTERM" in line and took < 15, (took, line)
    print(f"FIGURE SIGTERM: exit {took:.1f} s after the signal")
    assert_nothing_partial(LocalFileSystem(), str(out))
    assert not list(out.rglob("index.json"))


def test_typo_bucket_is_never_created(moto, faces, tmp_path):
    rc, _, err, took = finish(start(faces, "s3://typo-bukket/x", tmp_path, moto.env))
    line = one_line(err)
    assert rc == 2 and "bucket typo-bukket does not exist" in line and "rerun" not in line, line
    assert "typo-bukket" not in [b.rstrip("/") for b in moto.fs().ls("")]


@pytest.mark.parametrize("out", ["/proc/x", "file"])
def test_unwritable_out(faces, tmp_path, out):
    if out == "file":
        out = str(tmp_path / "a-file")
        Path(out).write_text("x")
    rc, _, err, _ = finish(start(faces, out, tmp_path))
    line = one_line(err)
    assert rc == 2 and out in line, line


def test_two_runs_on_one_out(moto, faces, tmp_path):
    fs = moto.fs()
    fs.mkdir("shared")
    first = start(faces, "s3://shared/run", tmp_path, moto.env)
    wait_for_lease = lambda: [f.replace("/.bfr-curate-lease.json", "/shards/x.parquet") for f in fs.find("shared")
                              if f.endswith(".bfr-curate-lease.json")]
    wait_for_shard(wait_for_lease)
    os.killpg(first.pid, signal.SIGSTOP)  # the first run is slow: still holding its lease when the second starts
    try:
        rc, _, err, took = finish(start(faces, "s3://shared/run", tmp_path, moto.env), timeout=120)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    line = one_line(err)
    assert rc == 1 and "is being written by" in line and f":{first.pid} since" in line, line
    rc, _, err, _ = finish(first, timeout=300)
    assert rc == 0, err[-3000:]
    assert_every_input_once("s3://shared/run")
