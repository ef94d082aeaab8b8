"""The Prefect API a command's flows report to, started while the command is still getting ready.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server on a run's first client call and waits for
it: a subprocess whose imports and database checks cost 4-5 CPU-seconds before the first task can start.
The console command starts that same server (Prefect's ephemeral mode, as Prefect runs it: uvicorn, no UI,
no scheduler, the SQLite database of ``PREFECT_HOME``) the moment it knows it will run a flow
(:func:`start_early`), then imports torch and plans its inputs while the server starts on another core;
:func:`prefect_api` waits for it only when the first flow starts. With ``PREFECT_API_URL`` set (a server
of your own, e.g. ``prefect server start --background``) nothing is started: the runs go there.

Only the console command starts early (``main()`` with no argv): a Python caller that runs several commands
in one process (the tests) keeps Prefect's own server, one per process.

A server that cannot start (a bad database URL in the settings, a broken install) ends the command before any
work, in one line quoting the server's own error (:class:`APIServerError`): Prefect's own server would fail
the same way, after its startup timeout.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

STOP_WAIT_S = 5  # as Prefect's own temporary server: then it is killed

_server: dict = {}  # the early server: {"process": Popen, "url": str, "log": its output (a temporary file)}
_certificate_folders: list[str] = []  # the folder of plain_http_ca_file's file, once made
_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b.*:")


class APIServerError(RuntimeError):
    """The command's Prefect API server did not start. One line, with the server's own reason."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def startup_timeout() -> float:
    return float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 180))


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url``/health until it answers 200 (True), or the process ended or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def start_early() -> None:
    """Start Prefect's temporary API server now, without waiting for it, unless the environment names an API."""
    if _server or os.environ.get("PREFECT_API_URL"):
        return
    _spawn()
    atexit.register(stop)  # registered before Prefect's own exit handlers, so it runs after them (they send logs)


# Settings that only make the temporary server answer sooner (yours, in the environment, win). Measured to its
# /health on an idle machine, 3.4 -> 3.0 s:
# - its block types: Prefect registers them in the database at each start, behind a memo that first loads every
#   installed Prefect collection to hash the block registry (0.3 s). This server serves no UI, and a block the
#   command saves (remote result storage, tasks/runtime.py) registers its own type;
# - py-key-value's run-time type checks (beartype), which instrument its modules as Prefect's server imports
#   them through docket (0.1 s).
QUICK_START = {"PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false",
               "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false", "PY_KEY_VALUE_DISABLE_BEARTYPE": "true"}

# ``python -m uvicorn``, with the garbage collector paused while the server imports (as the command does for its
# own imports, flows/heap.py: 5 full collections, 0.57 s of its 2.5 s of imports here) and then frozen
_SERVER_MAIN = ("import gc, sys\ngc.disable()\nimport prefect.server.api.server\nfrom uvicorn.main import main\n"
                "gc.freeze()\ngc.enable()\nsys.argv[0] = 'uvicorn'\nmain()")


def _spawn() -> None:
    port = free_port()
    # the command Prefect's SubprocessASGIServer runs (prefect/server/api/server.py), so the server is the same
    cmd = [sys.executable, "-c", _SERVER_MAIN, "--factory", "prefect.server.api.server:create_app",
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]
    env = {**QUICK_START, **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    # its output is not the command's (a server stopped while starting, by a command that fails its first
    # check, prints a traceback): kept aside, to quote if it does not come up
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    _server.update(process=process, url=f"http://127.0.0.1:{port}/api", log=log)


def _reason(log) -> str:
    """The server's own error: the last exception line of its output, else its last line."""
    log.seek(0)
    lines = [line.strip() for line in log.read()[-20000:].decode(errors="replace").splitlines() if line.strip()]
    return next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), lines[-1] if lines else "no output")


def wait_early(timeout: float) -> None:
    """Wait until the early server answers. A server that exited is started once more on another port (its
    port may have been taken meanwhile); then, or after ``timeout``, :class:`APIServerError`."""
    for attempt in (1, 2):
        process = _server["process"]
        if wait_healthy(_server["url"], process, timeout):
            return
        if process.poll() is None or attempt == 2:
            break
        _server["log"].close()
        _spawn()
    process, log = _server["process"], _server["log"]
    reason = f"no answer within {timeout:g} s" if process.poll() is None else _reason(log)
    stop()
    raise APIServerError(f"the Prefect API server did not start: {reason} "
                         f"(or set PREFECT_API_URL to a running server)")


@contextmanager
def use_api(url: str):
    """Point Prefect in this process (its settings) and the processes it starts (their environment) at ``url``,
    with :func:`plain_http_ca_file` for its clients (a command builds five, three after its server answered)."""
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: url}
    if (ca_file := plain_http_ca_file(url)) is not None:
        updates[PREFECT_API_SSL_CERT_FILE] = ca_file
    old = {setting.name: os.environ.get(setting.name) for setting in updates}
    os.environ.update({setting.name: value for setting, value in updates.items()})
    try:
        with temporary_settings(updates=updates):
            yield url
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def prefect_api():
    """Around a command's flow: once the early server answers, its runs go there; one that does not come up
    ends the command (:func:`wait_early`). Without an early server, Prefect runs as it would by itself (its
    own server, or ``PREFECT_API_URL``).

    Flow-run heartbeats are off unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is set (in the environment, a
    profile or prefect.toml): they only serve a server automation that marks silent runs as crashed, and
    each flow run pays for them at its end (Prefect's heartbeat thread sleeps in 1-s steps and the run joins
    it: 0.5 s on average, per stage of a recipe)."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings,
                                  temporary_settings)

    process = _server.get("process")
    if process is not None and (PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()):
        stop()  # Prefect's settings (a profile, prefect.toml) name an API, or allow no temporary server
        process = None
    if process is not None:
        wait_early(startup_timeout())
    with ExitStack() as stack:
        url = _server["url"] if process is not None else PREFECT_API_URL.value()
        if url:  # the early server, or one the environment or Prefect's settings name
            stack.enter_context(use_api(url))
        if "heartbeat_frequency" not in get_current_settings().flows.model_fields_set:
            stack.enter_context(temporary_settings(updates={"flows.heartbeat_frequency": None}))
        yield url


def stop(wait: float = STOP_WAIT_S) -> None:
    """Stop the early server (at exit, or sooner when a signal stops the command)."""
    end_process(_server.pop("process", None), wait)
    log = _server.pop("log", None)
    if log is not None:
        log.close()


def end_process(process: subprocess.Popen | None, wait: float) -> None:
    """Terminate a server process, kill it if it is still there ``wait`` seconds later, and reap it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def worker_client_env(url: str) -> dict:
    """Environment for worker processes this command starts (``--dask local``) that report to ``url``: what
    their Prefect settings would resolve to anyway, given up front, because a Dask worker rebuilds its settings
    and two API clients for every task run (the per-shard overhead, benchmarks/dask.py):

    - ``PREFECT_PROFILES_PATH``: the path this process resolved; otherwise every nested settings model of every
      task run looks for ``.env``, ``prefect.toml`` and ``pyproject.toml`` again to find it (~10 ms a run);
    - ``PREFECT_API_SSL_CERT_FILE``: :func:`plain_http_ca_file` (two clients per task run).

    Values already in the environment are kept."""
    from prefect.settings.sources import _get_profiles_path

    env = {"PREFECT_PROFILES_PATH": str(_get_profiles_path())}
    if (ca_file := plain_http_ca_file(url)) is not None:
        env["PREFECT_API_SSL_CERT_FILE"] = ca_file
    return {name: value for name, value in env.items() if name not in os.environ}


def plain_http_ca_file(url: str) -> str | None:
    """For a plain ``http://`` API URL, a CA file of one certificate for Prefect's API clients, unless
    ``PREFECT_API_SSL_CERT_FILE`` is set in the environment (yours wins); None for https (Prefect verifies).
    Prefect builds a verifying SSL context for every client, even one that never opens TLS, by loading
    certifi's ~150 certificates (~14-40 ms each). An http URL never checks a certificate, so what the file
    holds changes nothing but that cost."""
    if not url.startswith("http://") or "PREFECT_API_SSL_CERT_FILE" in os.environ:
        return None
    return _one_certificate_file()


@functools.cache
def _one_certificate_file() -> str:
    """A PEM file with certifi's first certificate, in a temporary folder removed at exit
    (:func:`remove_certificate_file`)."""
    import certifi

    bundle = Path(certifi.where()).read_text(encoding="ascii")
    first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n", bundle, re.S).group(0)
    folder = tempfile.mkdtemp(prefix="bfr-curate-api-")
    _certificate_folders.append(folder)
    atexit.register(remove_certificate_file)
    path = Path(folder) / "one-ca.pem"
    path.write_text(first, encoding="ascii")
    return str(path)


def remove_certificate_file() -> None:
    """Remove the CA file's folder: at exit, and before a stopped command ends without its exit handlers
    (:func:`flows.stop.exit_now`)."""
    while _certificate_folders:
        shutil.rmtree(_certificate_folders.pop(), ignore_errors=True)
