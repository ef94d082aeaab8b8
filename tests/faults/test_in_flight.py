"""run_stage keeps at most ``max_in_flight`` shard tasks submitted, even on an unbounded thread pool."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict

from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from bfr_models.manifest import ManifestWriter, read_manifest
from flows.stage import run_stage
from tasks.rows import error_row
from tasks.runtime import shard_cache_key
from tasks.shards import InputItem

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
