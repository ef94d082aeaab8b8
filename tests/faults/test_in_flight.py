"""run_stage keeps at most ``max_in_flight`` shard tasks submitted, even on an unbounded thread pool; a stop
signal abandons the shards in flight instead of waiting for them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from dataclasses import asdict

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from bfr_models.manifest import ManifestWriter, read_manifest
from flows.stage import run_stage
from tasks.rows import error_row
from tasks.runtime import shard_cache_key
from tasks.shards import InputItem
from tests.conftest import REPO

_lock = threading.Lock()
_running = {"now": 0, "peak": 0}


@task(cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def probe_shard(spec, stage_uri: str) -> dict:
    with _lock:
        _running["now"] += 1
        _running["peak"] = max(_running["peak"], _running["now"])
    time.sleep(0.3)
    with _lock:
        _running["now"] -= 1
    rows = [error_row("probe", item, "probe") for item in spec.items]
    return asdict(ManifestWriter(stage_uri).write_shard(spec.key, rows))


@flow(task_runner=ThreadPoolTaskRunner())  # unbounded: the bound must come from run_stage
def probe_flow(out: str, items: list) -> str:
    return run_stage(probe_shard, "probe", {"v": 1}, items, "probe-input", out, shard_size=2, max_in_flight=2)


def test_at_most_max_in_flight_shards_at_once(tmp_path):
    items = [InputItem(uri=f"/in/{i:03d}.png", version=str(i)) for i in range(24)]
    uri = probe_flow(str(tmp_path / "out"), items)
    assert len(read_manifest(uri)) == 24
    assert _running["peak"] == 2  # never more than the bound, and the bound is used


# A stage whose shards never finish by themselves, stopped the way the CLI stops (flows.cli.main).
SLOW_STAGE = """
import sys, time
from pathlib import Path
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner
from flows.stage import run_stage
from flows.stop import Interrupted, install_stop_handlers, say_stopped
from tasks.runtime import shard_cache_key
from tasks.shards import InputItem

@task(cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def slow_shard(spec, stage_uri: str) -> dict:
    Path(sys.argv[2]).touch()  # a shard is in flight
    time.sleep(600)

@flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
def slow_flow(out: str) -> str:
    items = [InputItem(uri=f"/in/{i}.png", version=str(i)) for i in range(4)]
    return run_stage(slow_shard, "slow", {"v": 1}, items, "slow-input", out, shard_size=1)

install_stop_handlers()
try:
    slow_flow(sys.argv[1])
except Interrupted as e:
    say_stopped(str(e))
    sys.exit(1)
"""


def _running_task_runs(db_path) -> int:
    try:
        with closing(sqlite3.connect(db_path, timeout=1)) as db:
            return db.execute("SELECT count(*) FROM task_run WHERE state_type = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:  # not created yet, or busy
        return 0


def test_sigterm_abandons_the_shards_in_flight(tmp_path):
    out, marker = tmp_path / "out", tmp_path / "in-flight"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "BFR_CURATE_STOP_GRACE": "600"}  # the grace is not what ends it
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STAGE, str(out), str(marker)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no shard started"
        # task-run states reach Prefect's database as events: signal once it holds both shards as Running
        while _running_task_runs(tmp_path / "prefect" / "prefect.db") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "stopped by SIGTERM" in err and took < 20, (took, err[-2000:])
    print(f"FIGURE SIGTERM with shards in flight: exit {took:.1f} s after the signal")
    assert not list(out.rglob("index.json")) and not list(out.rglob("*.parquet"))  # nothing partial
    assert not list(out.rglob(".bfr-curate-lease.json"))  # released before the exit: a rerun starts at once
    # what the Prefect UI shows: the run and its shards in flight ended Crashed with the line, none left Running
    with closing(sqlite3.connect(tmp_path / "prefect" / "prefect.db")) as db:
        flow_runs = db.execute("SELECT state_type, state_name FROM flow_run").fetchall()
        task_runs = db.execute("SELECT state_type FROM task_run").fetchall()
        message = db.execute("SELECT message FROM flow_run_state WHERE type = 'CRASHED'").fetchall()
    assert flow_runs == [("CRASHED", "Crashed")], flow_runs
    assert sorted(task_runs) == [("CRASHED",), ("CRASHED",)], task_runs  # the two shards in flight
    assert message == [("stopped by SIGTERM; finished shards are kept, rerun to resume",)]
