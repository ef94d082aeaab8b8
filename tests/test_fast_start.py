"""Start-up: help and argument errors never load the heavy libraries (torch, Prefect, diffusers, pandas ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "prefect", "diffusers", "pandas", "pyarrow", "pyiqa", "numpy", "fsspec", "s3fs", "dask")

# Runs every command's --help and two argument errors the way the console script does (flows.cli.main),
# then prints the exit codes and the heavy top-level modules that got imported.
PROBE = """
import argparse, json, sys
from flows.cli import build_parser, main

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))

codes = {}
for argv in [["--help"], *([*c, "--help"] for c in commands(build_parser())), ["degrade"], ["score", "--workers", "x"]]:
    try:
        main(argv)
    except SystemExit as e:
        codes[" ".join(argv)] = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1:]))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_and_argument_errors_import_no_heavy_library():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PROBE, *HEAVY], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    codes = result["codes"]
    assert {"--help", "degrade --help", "manifest show --help", "prior train --help", "export --help"} <= set(codes)
    assert codes["degrade"] == 2 and codes["score --workers x"] == 2  # argparse's usage errors
    assert all(code == 0 for argv, code in codes.items() if argv.endswith("--help")), codes
    assert result["heavy"] == []


SHOW = """
import json, sys
from flows.cli import main
codes = [main(["manifest", "show", sys.argv[1], "--head", "2"]), main(["manifest", "show", sys.argv[2]])]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "prefect", "diffusers", "pyiqa"})
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_manifest_show_imports_neither_torch_nor_prefect(tmp_path):
    from bfr_models.manifest import ManifestWriter

    writer = ManifestWriter(str(tmp_path / "degrade" / "k"))
    rows = [{"image_id": "a", "uri": None, "stage": "degrade", "status": "error", "error": "probe", "niqe": 1.0}]
    writer.write_index("degrade", "k", {}, [writer.write_shard("s", rows)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SHOW, writer.stage_uri, str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 2] and "rows:     1  ok 0  error 1" in proc.stdout
    assert "bfr-curate: error: " in proc.stderr  # the missing manifest, explained in one line
    assert result["heavy"] == []


def test_flow_commands_are_commands():
    """The commands the console command starts Prefect's API for early all exist (a stale name would only
    make that command slower)."""
    import argparse

    from flows.cli import FLOW_COMMANDS, build_parser

    def names(parser, prefix=""):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}"
                    yield from names(sub, f"{prefix}{name} ")

    known = set(names(build_parser()))
    assert FLOW_COMMANDS <= known, FLOW_COMMANDS - known
    assert {"manifest show", "presets", "models list", "export", "runs", "gc"}.isdisjoint(FLOW_COMMANDS)


STAGES = """
import json, sys
from flows.cli import main
faces, out = sys.argv[1], sys.argv[2]
codes = [main(["degrade", "--preset", "gfpgan", "--input", faces, "--out", out, "--device", "cpu"]),
         main(["score", "--metrics", "niqe", "--input", out + "/degrade", "--out", out, "--device", "cpu"])]
print(json.dumps({"codes": codes, "torchvision": "torchvision" in sys.modules}))
"""


def test_gfpgan_degrade_and_niqe_score_do_not_import_torchvision(tmp_path):
    """torchvision's import costs ~0.8 s of start-up (torch._dynamo, through torchvision.ops): the gfpgan
    colour jitter has the same operations without it, and only FID's Inception needs it."""
    from tests.conftest import face_like, write_png

    for i in range(3):
        write_png(tmp_path / "faces" / f"f{i}.png", face_like(i, 96))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", STAGES, str(tmp_path / "faces"), str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"codes": [0, 0], "torchvision": False}


def test_flow_runs_send_heartbeats_only_when_asked(monkeypatch):
    """Prefect's flow-run heartbeat thread sleeps in 1-s steps and each flow run joins it at its end (~0.5 s
    per run, per stage of a recipe); they serve only a server automation on missing heartbeats, so they are
    off unless a frequency is set."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    from flows.api_server import prefect_api

    with temporary_settings(restore_defaults={PREFECT_API_URL}), prefect_api() as url:
        assert url is None and get_current_settings().flows.heartbeat_frequency is None
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), prefect_api():
        assert get_current_settings().flows.heartbeat_frequency is None
    with temporary_settings(updates={"flows.heartbeat_frequency": 60}), prefect_api():
        assert get_current_settings().flows.heartbeat_frequency == 60


def test_a_command_on_a_plain_http_api_gives_its_clients_one_certificate(monkeypatch):
    """Prefect builds a verifying SSL context for every API client, loading certifi's bundle (~40 ms), even for
    an http URL that never opens TLS; a command's own clients get one certificate, as its Dask workers'."""
    import ssl

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_URL, temporary_settings

    from flows.api_server import prefect_api

    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    before = PREFECT_API_SSL_CERT_FILE.value()
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), prefect_api() as url:
        cafile = PREFECT_API_SSL_CERT_FILE.value()
        assert url == "http://127.0.0.1:4200/api" and os.environ["PREFECT_API_SSL_CERT_FILE"] == cafile != before
        assert ssl.create_default_context(cafile=cafile).cert_store_stats()["x509_ca"] == 1
        get_client(sync_client=True)  # a client builds with it (a bad CA file would raise here)
    assert "PREFECT_API_SSL_CERT_FILE" not in os.environ and PREFECT_API_SSL_CERT_FILE.value() == before
    with temporary_settings(updates={PREFECT_API_URL: "https://prefect.example.com/api"}), prefect_api():
        assert PREFECT_API_SSL_CERT_FILE.value() == before  # TLS: Prefect's own verification
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", "/etc/ssl/mine.pem")
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}), prefect_api():
        assert os.environ["PREFECT_API_SSL_CERT_FILE"] == "/etc/ssl/mine.pem"  # the user's value wins


# A process with the worker environment: the settings and client a task run on a Dask worker builds.
WORKER_PROBE = """
import json, ssl
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_SSL_CERT_FILE
from prefect.settings.sources import _get_profiles_path

client = get_client(sync_client=True)
cafile = PREFECT_API_SSL_CERT_FILE.value()
print(json.dumps({"profiles": str(_get_profiles_path()), "cafile": cafile,
                  "cas": ssl.create_default_context(cafile=cafile).cert_store_stats()["x509_ca"]}))
"""


def test_dask_local_workers_get_what_their_settings_resolve_to(monkeypatch):
    """A Dask worker rebuilds Prefect's settings and two API clients for every task run: ``--dask local``
    gives its workers the profiles path this process resolved, and for a plain-http API a one-certificate CA
    file instead of certifi's bundle; https keeps Prefect's verification, and the user's values win."""
    from prefect.settings.sources import _get_profiles_path

    from flows.api_server import worker_client_env

    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    env = worker_client_env("http://127.0.0.1:4200/api")
    assert env["PREFECT_PROFILES_PATH"] == str(_get_profiles_path())
    proc = subprocess.run([sys.executable, "-c", WORKER_PROBE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "profiles": env["PREFECT_PROFILES_PATH"], "cafile": env["PREFECT_API_SSL_CERT_FILE"], "cas": 1}

    assert "PREFECT_API_SSL_CERT_FILE" not in worker_client_env("https://prefect.example.com/api")
    monkeypatch.setenv("PREFECT_API_SSL_CERT_FILE", "/etc/ssl/mine.pem")
    assert "PREFECT_API_SSL_CERT_FILE" not in worker_client_env("http://127.0.0.1:4200/api")


def console_degrade(tmp_path, timeout: float, then: str = "", **env) -> subprocess.CompletedProcess:
    """The console command as a user runs it (``main()``: no argv given) degrading two small faces of
    ``tmp_path/faces`` into ``tmp_path/out``, with its own temporary API server; ``env`` on top. ``then``:
    Python run in the same process after ``main()`` returned."""
    from tests.conftest import face_like, write_png

    for i in range(2):
        write_png(tmp_path / "faces" / f"f{i}.png", face_like(i, 64))
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    env.pop("PREFECT_API_URL", None)
    code = f"from flows.cli import main\nmain()\n{then}"
    return subprocess.run([sys.executable, "-c", code, "degrade", "--preset", "gfpgan", "--input",
                           str(tmp_path / "faces"), "--out", str(tmp_path / "out"), "--device", "cpu"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_a_prefect_server_that_cannot_start_ends_the_command_in_one_line(tmp_path):
    """The console command's early API server dies at startup (here: Prefect's database URL names a folder
    that does not exist). The command ends before any work with the server's own reason in one line, instead
    of falling back to Prefect's own server, which fails the same way after its startup timeout (180 s)."""
    proc = console_degrade(tmp_path, timeout=150, PREFECT_SERVER_DATABASE_CONNECTION_URL=(
        f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/prefect.db"))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bfr-curate: error: the Prefect API server did not start: "), proc.stderr
    assert "unable to open database file" in last
    assert not (tmp_path / "out" / "degrade").exists()


def test_the_console_command_skips_teardown_only_after_its_output_and_logs_are_out(tmp_path):
    """The console command leaves with ``os._exit`` once Python's exit handlers ran (flows/cli.py), skipping
    ~1 s of module teardown. What those handlers deliver is all there: the exit code, the summary printed to
    a pipe, and the flow run's last log line, which Prefect's log worker sends to the API in batches (read
    back from the temporary server's database, which outlives it)."""
    import sqlite3

    home = tmp_path / "prefect-home"
    proc = console_degrade(tmp_path, timeout=300, PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="INFO")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "degrade: 2 rows (2 ok, 0 error)"
    assert proc.stdout.splitlines()[-1].startswith("  key:")
    with sqlite3.connect(home / "prefect.db") as db:
        states = db.execute("select state_type from flow_run").fetchall()
        messages = [m for (m,) in db.execute("select message from log")]
    assert states == [("COMPLETED",)]
    assert any(m.startswith("Finished in state Completed") for m in messages), messages


def test_the_console_command_imports_its_stage_without_collecting_then_freezes_what_it_imported(tmp_path):
    """flows/heap.py: no garbage collection while the command imports torch, Prefect and the stage (0.47 s of
    full collections importing ``flows.degrade`` here); then every object is moved into the permanent
    generation, and the collector is back on for the run."""
    # registered after main() returned: Python's exit handlers run last-in first, so this one runs before the
    # command's os._exit
    then = ("import atexit, gc\n"
            "atexit.register(lambda: print('gc', gc.isenabled(), gc.get_freeze_count(), flush=True))")
    proc = console_degrade(tmp_path, timeout=300, then=then)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "degrade: 2 rows (2 ok, 0 error)"
    _, enabled, frozen = proc.stdout.splitlines()[-1].split()
    assert enabled == "True" and int(frozen) > 100_000, proc.stdout  # torch alone makes more
