"""Intra-op threads per shard worker: cores // workers (at least 1), set where the shards run, recorded."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from prefect import flow, task
from prefect.task_runners import ThreadPoolTaskRunner

from bfr_models.device import get_cpu_lanes, set_cpu_lanes
from bfr_models.manifest import ManifestWriter, read_index
from flows.runners import local_cluster_kwargs
from flows.stage import run_stage
from flows.threads import available_cores, cpu_lanes, intra_op_threads
from tasks.rows import error_row
from tasks.runtime import shard_cache_key
from tasks.shards import InputItem

seen = []  # torch threads inside each shard task
lanes_seen = []  # CPU lanes inside each shard task


@pytest.fixture
def no_omp_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_rule(no_omp_env, monkeypatch):
    assert [intra_op_threads(w, cores=16) for w in (1, 2, 3, 4, 16, 32)] == [16, 8, 5, 4, 1, 1]
    assert intra_op_threads(2, cores=2) == 1 and intra_op_threads(1, cores=2) == 2
    assert intra_op_threads(0, cores=4) == 4  # never a division by zero
    assert intra_op_threads(1) == available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's explicit setting wins
    assert intra_op_threads(1, cores=16) == 3


def test_the_cores_a_lone_shard_would_leave_idle_become_cpu_lanes():
    # (workers, shards, intra-op threads, cores) -> lanes
    cases = {(2, 1, 1, 2): 2, (2, 5, 1, 2): 1, (2, 2, 1, 2): 1, (1, 1, 2, 2): 1, (4, 1, 4, 16): 4,
             (4, 2, 4, 16): 2, (4, 9, 4, 16): 1, (2, 0, 1, 2): 2, (3, 1, 1, 2): 2, (2, 1, 4, 2): 1}
    assert {case: cpu_lanes(*case[:3], cores=case[3]) for case in cases} == cases


def test_dask_local_workers_get_the_rule_in_their_environment(no_omp_env):
    env = local_cluster_kwargs(2)["env"]
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == str(intra_op_threads(2))


@task(cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def threads_shard(spec, stage_uri: str) -> dict:
    seen.append(torch.get_num_threads())
    lanes_seen.append(get_cpu_lanes())
    rows = [error_row("threads", item, "probe") for item in spec.items]
    return asdict(ManifestWriter(stage_uri).write_shard(spec.key, rows))


@flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
def threads_flow(out: str, items: list) -> str:
    return run_stage(threads_shard, "threads", {"v": 1}, items, "threads-input", out, shard_size=2)


def test_shard_tasks_of_a_thread_pool_use_the_rule_and_the_index_records_it(no_omp_env, tmp_path):
    torch.set_num_threads(available_cores())  # what torch starts with: one per core
    lanes_seen.clear()
    items = [InputItem(uri=f"/in/{i}.png", version=str(i)) for i in range(6)]
    uri = threads_flow(str(tmp_path / "out"), items)
    expected = intra_op_threads(2)
    assert seen and set(seen) == {expected}, seen
    assert read_index(uri)["config"]["threads"] == expected
    assert len(read_index(uri)["shards"]) >= 2 and lanes_seen[:2] == [1, 1]  # two shards at once: no core idle
    # as the shards finished, the idle workers' cores went to those left: with none left, all of them
    assert get_cpu_lanes() == cpu_lanes(2, 0, expected) == available_cores() // expected
    set_cpu_lanes(1)


def test_a_lone_shard_gets_the_cores_the_other_workers_would_have_had_as_cpu_lanes(no_omp_env, tmp_path):
    lanes_seen.clear()
    try:
        uri = threads_flow(str(tmp_path / "out"), [InputItem(uri="/in/alone.png", version="1")])
    finally:
        set_cpu_lanes(1)
    assert len(read_index(uri)["shards"]) == 1
    assert lanes_seen == [cpu_lanes(2, 1, intra_op_threads(2))]
    assert available_cores() < 2 or lanes_seen[0] >= 2  # both workers' cores, where there are two
