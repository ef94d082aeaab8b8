"""Shared fixtures: an isolated Prefect home, a real S3 endpoint (moto server), small real images."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Prefect reads its settings at import: isolate its home (SQLite DB, local results) before any test imports it.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="bfr-curate-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)  # runs after Prefect's own
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # slow, busy machines

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint: moto's standalone server on 127.0.0.1, as s3fs tests itself."""
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto server did not start")
    yield endpoint
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    name = "bfr-" + request.node.name.lower().replace("_", "-")[:40]
    fs.mkdir(name)
    yield f"s3://{name}"


def face_like(seed: int, size: int = 64) -> np.ndarray:
    """A small real photo crop (skimage's astronaut face), shifted per seed so contents differ."""
    from skimage import data

    astro = data.astronaut()[30:230, 140:340]
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, 40, size=2)
    crop = astro[y : y + 160, x : x + 160]
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "faces"
    for i in range(6):
        write_png(folder / f"face_{i:02d}.png", face_like(i))
    return folder


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb), without the pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """Every kind of bad or unusual input a user's folder may hold."""
    folder = tmp_path / "bad"
    folder.mkdir()
    good = face_like(0)
    (folder / "zero.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "text.png").write_text("this is not an image\n")
    Image.fromarray((good[..., 0].astype(np.uint16) * 257)).save(folder / "gray16.png")
    import cv2

    cv2.imwrite(str(folder / "rgb16.png"), good[..., ::-1].astype(np.uint16) * 257)
    Image.fromarray(good).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    rgba = np.dstack([good, np.full(good.shape[:2], 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(good[..., 1]).save(folder / "gray.png")
    (folder / "huge.png").write_bytes(huge_png_header())
    write_png(folder / "ok.png", good)
    return folder


def install_models(monkeypatch, tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A model cache holding ``files`` (card name -> bytes) under each real card's file name, and a
    catalog whose cards are the real ones with the sha256 of these test files (:func:`write_catalog`)."""
    from bfr_models.models import write_catalog

    cache = tmp_path / "model-cache"
    for key, value in write_catalog(files, cache, tmp_path / "catalogs").items():
        monkeypatch.setenv(key, value)
    return cache


@pytest.fixture(scope="session")
def musiq_bytes() -> bytes:
    """A MUSIQ checkpoint: pyiqa's real architecture, seeded random weights (no trained MUSIQ offline)."""
    import torch

    from bfr_models.metrics.musiq import build_musiq_arch

    with torch.random.fork_rng(devices=[]):  # the tests' global generator is left as it was
        torch.manual_seed(0)
        state = build_musiq_arch().state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def task_states(flow_state):
    """Names of the final states of every task run of a flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200)
    return sorted(r.state.name for r in runs)


CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make browser` (part of `make test`) installs it
# As root and on a closed network Chromium needs these to start quickly and quietly.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


# Module scope, not session: while Playwright's sync API is open its event loop runs in the main thread, so
# Prefect takes the tests after it for async code (State.result() and the like return coroutines).
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by Playwright (its own browser download is never used)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser page; console errors are collected in `page.errors` for tests to assert on."""
    context = browser.new_context()
    new_page = context.new_page()
    new_page.errors = []
    new_page.on("pageerror", lambda error: new_page.errors.append(str(error)))
    yield new_page
    context.close()
