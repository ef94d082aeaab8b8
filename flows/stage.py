"""Running a stage: where it writes, its shards as Prefect tasks, its progress bar, its index."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from queue import Empty, Queue

from prefect.context import FlowRunContext, TagsContext
from tqdm.auto import tqdm

from bfr_models import lease, manifest, storage
from bfr_models.manifest import ManifestWriter, ShardInfo
from flows.run_info import publish_stage_summary
from flows.stop import abandon_on_stop, reclaim_sigterm
from flows.threads import shard_threads, spread_idle_cores
from tasks.runtime import host_gpu_slot, result_storage, uses_dask, watch_images
from tasks.shards import InputItem, code_version, make_shards, stable_hash

INPUTS_NAME = "inputs.json"  # incremental stages: which inputs each shard holds
DEFAULT_IN_FLIGHT = 8  # shards in flight when the task runner sets no bound (an unbounded thread pool)
PROGRESS_POLL = 0.5  # seconds between reads of the in-flight shards' per-batch progress


class StageError(RuntimeError):
    """A stage that could not finish: some shard tasks failed."""


def in_flight_limit() -> int:
    """How many shard tasks to keep submitted: the flow's thread pool size; on Dask, two per worker thread of
    the cluster (one running, one queued, so no worker waits on the flow); else DEFAULT_IN_FLIGHT."""
    workers = _dask_workers()
    if workers is not None:
        return max(DEFAULT_IN_FLIGHT, 2 * sum(w.get("nthreads", 1) for w in workers))
    workers = getattr(_task_runner(), "_max_workers", None)
    return workers if workers and workers < sys.maxsize else DEFAULT_IN_FLIGHT


def _task_runner():
    context = FlowRunContext.get()
    return context.task_runner if context else None


def subflow_runner():
    """This flow's task runner for a subflow it calls, which otherwise gets a default runner of its own (an
    unbounded thread pool, never the Dask cluster). A copy with the same settings: a runner in use may hold a
    live Dask client, which would travel, pickled, with the subflow's tasks."""
    return FlowRunContext.get().task_runner.duplicate()


def _dask_workers() -> list[dict] | None:
    """The Dask cluster's workers (the scheduler's info on each) when the flow runs on Dask, else None."""
    if not uses_dask():
        return None
    return list(_task_runner().client.scheduler_info(n_workers=-1)["workers"].values())


def store_grace() -> float:
    """How long in-flight shards may still run after the store failed (their own requests time out sooner)."""
    return float(os.environ.get("BFR_CURATE_STORE_GRACE", "30"))


def stage_location(out: str, stage: str, config: dict, input_uri: str) -> tuple[str, str]:
    """The stage's key and folder: the same inputs and config always land in the same place."""
    key = stable_hash([stage, config, storage.normalize(input_uri)], length=12)
    return key, storage.join(storage.normalize(out), stage, key)


def _item_id(item: InputItem) -> str:
    return stable_hash([item.uri, item.version, item.parent_id, item.reference])


def reusable_shards(stage_uri: str, items: list[InputItem], code: str) -> tuple[list[ShardInfo], list[InputItem], dict]:
    """Shards of an earlier run of this stage whose inputs are all still there, unchanged, with the same code
    (``code``: the stage's code version).

    Returns (kept shards, the items no kept shard holds, kept shard name -> item ids). Images added to a
    scheduled dataset then go to new shards only; everything already done is neither recomputed nor
    re-sharded (content-defined shard boundaries alone would re-run every shard a new image lands in).
    """
    uri = storage.join(stage_uri, INPUTS_NAME)
    if not storage.exists(uri) or not manifest.index_uri(stage_uri):
        return [], items, {}
    try:
        recorded = json.loads(storage.read_bytes(uri))
        index = manifest.read_index(stage_uri, check_shards=False)  # each shard is checked below
    except ValueError:  # a corrupt inputs.json or index (ManifestError): nothing to reuse, this run rewrites both
        return [], items, {}
    if not isinstance(recorded, dict) or recorded.get("code") != code or not isinstance(
            recorded.get("shards"), dict):
        return [], items, {}
    ids = {_item_id(i): i for i in items}
    images = manifest.image_names(stage_uri)
    kept, held = [], {}
    for shard in index["shards"]:
        members = recorded["shards"].get(shard["name"])
        # a damaged shard (missing, other bytes, missing images) is not kept: its items are processed again
        if members and all(m in ids for m in members) and not manifest.shard_files_problem(stage_uri, shard, images):
            kept.append(ShardInfo(**shard))
            held[shard["name"]] = members
    done = {m for members in held.values() for m in members}
    return kept, [i for i in items if _item_id(i) not in done], held


def run_stage(shard_task, stage: str, config: dict, items: list[InputItem], input_uri: str, out: str,
              shard_size: int, incremental: bool = False, finalize=None, max_in_flight: int | None = None,
              **task_kwargs) -> str:
    """Run one task per shard (cached), then write the index. Returns the manifest URI.

    ``incremental``: keep the shards of the previous run in this stage folder whose inputs are unchanged
    and process only the other items (see :func:`reusable_shards`). ``finalize(stage_uri, shards)``: set-level
    results computed once every shard is done (FID, ...), returned as a dict of extra index config fields.
    ``max_in_flight``: shard tasks submitted at once (default :func:`in_flight_limit`). The stage folder is
    leased for the run.
    """
    reclaim_sigterm()
    storage.check_writable(out)
    key, stage_uri = stage_location(out, stage, config, input_uri)
    with abandon_on_stop(), lease.hold(stage_uri):  # a stop signal: out once the lease is released
        code = code_version(shard_task.fn.__module__)  # only the modules this stage runs
        kept, todo, held = reusable_shards(stage_uri, items, code) if incremental else ([], items, {})
        specs = make_shards(stage, {**config, "code": code}, todo, shard_size)
        # JSON results, so a cached record can be checked before it is used (tasks.runtime.shard_cache_key)
        configured = shard_task.with_options(result_storage=result_storage(stage_uri), result_serializer="json")
        shards, failures = list(kept), []
        limit = max_in_flight or in_flight_limit()
        threads = shard_threads(_task_runner(), limit, len(specs))
        with tqdm(total=len(todo), desc=stage, unit="img", dynamic_ncols=True) as bar, \
                watch_images([s.key for s in specs], _task_runner().client if uses_dask() else None) as images_done:
            shown: dict[str, int] = {}  # shard key -> images on the bar

            def show(key: str, done: int) -> None:
                bar.update(done - shown.get(key, 0))
                shown[key] = done

            def on_wait(keys: list[str]) -> None:  # shards in flight: the batches they reported done
                for key in keys:
                    show(key, images_done(key))

            for done, (spec, result) in enumerate(_run_shards(
                    configured, specs, limit, stage_uri=stage_uri, on_wait=on_wait,
                    resources=gpu_request(task_kwargs.get("device")), **task_kwargs), start=1):
                spread_idle_cores(_task_runner(), limit, len(specs) - done)
                if isinstance(result, Exception):  # report every failed shard, not just the first
                    failures.append(f"shard {spec.key}: {type(result).__name__}: {result}")
                else:
                    shards.append(ShardInfo(**result))
                show(spec.key, len(spec.items))
        if failures:
            raise StageError(f"{len(failures)} of {len(specs)} shards failed (the others are kept). First: {failures[0]}")
        if incremental:
            held.update({s.key: [_item_id(i) for i in s.items] for s in specs})
            storage.write_bytes_atomic(storage.join(stage_uri, INPUTS_NAME),
                                       json.dumps({"code": code, "shards": held}).encode())
        extra = finalize(stage_uri, shards) if finalize is not None else {}
        ManifestWriter(stage_uri).write_index(stage, key, {**config, **extra, "threads": threads}, shards,
                                                  input=storage.normalize(input_uri))
    publish_stage_summary(stage_uri)
    return stage_uri


def skipped_record(input_uri: str, skipped: int, exclude) -> dict:
    """What a stage's index records about a folder input's files that got no row (dotfiles, ``exclude``
    matches); beside the config, never part of the stage key."""
    if manifest.is_manifest(input_uri):
        return {}
    return {"skipped_inputs": skipped, "exclude": list(exclude)}


def gpu_request(device: str | None) -> dict | None:
    """``{"GPU": 1}`` for each shard task of a stage that may use a GPU (``device`` not cpu) when the flow runs
    on a Dask cluster whose workers advertise GPU resources (``dask worker --resources GPU=1``, one worker per
    GPU): Dask then runs one shard per GPU at a time. None otherwise (asking a cluster without them would wait
    forever)."""
    workers = _dask_workers() if device not in (None, "cpu") else None
    if workers and any(w.get("resources", {}).get("GPU") for w in workers):
        return {"GPU": 1}
    return None


@contextmanager
def task_resources(resources: dict | None):
    """Tasks submitted inside ask the Dask cluster for ``resources`` (None: nothing asked)."""
    if resources is None:
        yield
        return
    import dask

    with dask.annotate(resources=resources):
        yield


@contextmanager
def untagged():
    """Task runs submitted here carry no tags (their flow run keeps the stage's). Prefect asks its API for a tag
    concurrency slot before every tagged task run; with the stage's tags that left both cores idle ~2 s at a
    shard's start after the first ones (1000 faces, 3 shards: 13.0 -> 11.4 s)."""
    with TagsContext(current_tags=set()):
        yield


def run_training(task, *, device: str, desc: str, total: int, unit: str, **task_kwargs):
    """Run one long task (a training run, given ``device`` and ``task_kwargs``, which hold its ``key``) where
    the flow's tasks run.

    On threads it runs in this process and shows its own progress bar. On Dask it is one task on a worker,
    asking for a GPU when the workers advertise them (:func:`gpu_request`), its device resolved there; the
    worker reports its steps as Dask events (:func:`tasks.runtime.report_images`, keyed by the task's
    ``key``) and this process shows them on a bar of ``total`` ``unit``."""
    if not uses_dask():
        with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
            return task(device=device, **task_kwargs)
    finished = threading.Event()
    with task_resources(gpu_request(device)):
        future = task.submit(device=device, **task_kwargs)
    future.add_done_callback(lambda _: finished.set())
    key = task_kwargs["key"]
    with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True) as bar, \
            watch_images([key], _task_runner().client) as steps_done:
        while not finished.wait(PROGRESS_POLL):
            bar.update(steps_done(key) - bar.n)
        bar.update(steps_done(key) - bar.n)
    return future.result()


def _run_shards(task, specs: list, limit: int, stage_uri: str, resources: dict | None = None, on_wait=None,
                **task_kwargs):
    """Yield ``(spec, result or exception)`` per shard, with at most ``limit`` tasks submitted at a time.
    ``on_wait(keys)`` is called every :data:`PROGRESS_POLL` seconds no shard finished, with the in-flight keys.

    After the first store failure nothing more is submitted; the shards in flight get
    :func:`store_grace` seconds, then one :class:`storage.StoreError` naming the store and cause is raised.
    """
    queue, in_flight, fault, deadline = list(reversed(specs)), {}, None, None
    finished = Queue()  # futures put themselves here when done
    while in_flight or (queue and fault is None):
        while queue and fault is None and len(in_flight) < limit:
            spec = queue.pop()
            with task_resources(resources), untagged():
                future = task.submit(spec=spec, stage_uri=stage_uri, **task_kwargs)
            in_flight[future] = spec
            future.add_done_callback(finished.put)
        left = None if deadline is None else deadline - time.monotonic()
        try:
            future = finished.get(timeout=PROGRESS_POLL if left is None else max(0.0, min(left, PROGRESS_POLL)))
        except Empty:
            if left is not None and left <= PROGRESS_POLL:
                break  # in-flight shards abandoned: their files are written atomically, nothing partial shows
            if on_wait is not None:
                on_wait([s.key for s in in_flight.values()])
            continue
        spec = in_flight.pop(future)
        try:
            result = future.result()
        except Exception as e:
            if fault is None and storage.is_store_fault(e):
                fault, deadline = e, time.monotonic() + store_grace()
            result = e
        yield spec, result
    if fault is not None:
        done = len(specs) - len(queue) - len(in_flight)
        raise storage.StoreError(f"{storage.store_error(stage_uri, fault)} ({done} of {len(specs)} shards finished; "
                                 "rerun to resume once the store answers)") from fault
