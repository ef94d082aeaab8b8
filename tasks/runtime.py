"""Prefect plumbing shared by every shard task: cache keys, result storage, GPU slots."""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import torch
from prefect.concurrency.sync import concurrency
from prefect.filesystems import RemoteFileSystem
from prefect.logging import get_logger
from prefect.serializers import JSONSerializer

from bfr_models import manifest, storage
from bfr_models.device import configure_backends

GPU_LIMIT_PREFIX = "bfr-curate-gpu"
RESULTS_FOLDER = "_prefect"  # Prefect's result records of a stage's shard tasks, beside its data
# The only result record a cached task may come from: Prefect's default JSON serializer (every persisted task
# asks for it). A record naming another serializer (pickle) or decoder is never read: it would run code.
_JSON_SERIALIZER = json.loads(JSONSerializer().model_dump_json())
_SHARD_FIELDS = {f.name for f in fields(manifest.ShardInfo)}
log = get_logger("bfr_curate")
_LOADING = threading.RLock()  # reentrant: a loader may call another loader


_images_done: dict[str, int] = {}  # shard key -> images done so far, for the shards a driver here watches
_images_lock = threading.Lock()
PROGRESS_TOPIC = "bfr-curate-images"  # Dask event topic: [shard key, images] from a shard task on a worker


def report_images(shard_key: str | None, n: int) -> None:
    """A shard task's progress inside its shard (``n`` more images done; a training task's: steps), for the
    progress bar of its driver: counted here when the driver watches in this process (the thread runner),
    else, on a Dask worker, sent to the driver as a Dask event (a small message through the scheduler, once
    per batch)."""
    if _count(shard_key, n):
        return
    worker = _dask_worker()
    if worker is not None and shard_key is not None:
        worker.log_event(PROGRESS_TOPIC, [shard_key, n])


def _dask_worker():
    """The Dask worker running this task, or None (distributed is only looked for where it is imported)."""
    distributed = sys.modules.get("distributed")
    if distributed is None:
        return None
    try:
        return distributed.get_worker()
    except ValueError:
        return None


def _count(shard_key: str | None, n: int) -> bool:
    """Add ``n`` images to a shard watched in this process; False if nobody here watches it."""
    with _images_lock:
        if shard_key not in _images_done:
            return False
        _images_done[shard_key] += n
        return True


def _count_event(event) -> None:
    """A worker's progress event (timestamp, [shard key, images]), on the driver."""
    _count(*event[1])


@contextmanager
def watch_images(keys: list[str], client=None):
    """While open, :func:`report_images` counts for these shard keys; yields a function key -> images done.
    ``client``: the flow's Dask client, whose workers' counts arrive as events on :data:`PROGRESS_TOPIC`."""
    with _images_lock:
        _images_done.update({k: 0 for k in keys})
    if client is not None:
        client.subscribe_topic(PROGRESS_TOPIC, _count_event)  # one handler for every stage watching
    try:
        yield lambda key: _images_done.get(key, 0)
    finally:
        with _images_lock:
            for k in keys:
                _images_done.pop(k, None)
            last = not _images_done
        if client is not None and last:
            client.unsubscribe_topic(PROGRESS_TOPIC)


def load_once(maxsize: int):
    """``lru_cache`` for model loads, behind one lock: shard tasks run in threads, and threads that miss the
    cache together would each load their own copy (several copies of a large prior on one GPU)."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            with _LOADING:
                return cached(*args, **kwargs)

        guarded.cache_info, guarded.cache_clear = cached.cache_info, cached.cache_clear
        return guarded

    return wrap


def shard_cache_key(context, parameters) -> str:
    """Cache key of a shard task: the shard's own key (stage, config, inputs, code version).

    Its cached result is used only if it checks out (:func:`drop_untrusted_result`, :func:`_shard_problem`);
    otherwise the record is removed here, before Prefect reads it, and the shard is recomputed under the same key.
    """
    spec, stage_uri = parameters["spec"], parameters["stage_uri"]
    run = context.task_run
    drop_untrusted_result(storage.join(stage_uri, RESULTS_FOLDER, spec.key),
                          lambda result: _shard_problem(stage_uri, result, str(run.flow_run_id or run.id)))
    return spec.key


def key_parameter(context, parameters) -> str:
    """Cache key of a task whose caller computed it and passes it as ``key`` (training, searches).

    Its cached result is used only if the record is plain JSON (never a pickle: it would run code).
    """
    key = parameters["key"]
    base = getattr(context.result_store.result_storage, "basepath", None)  # None: Prefect's own local store
    if base:
        drop_untrusted_result(storage.join(str(base), key))
    return key


def drop_untrusted_result(uri: str, check=None) -> None:
    """Remove the task result record at ``uri`` unless it is plain JSON and ``check(result)`` finds no problem."""
    try:
        raw = storage.read_bytes(uri)
    except FileNotFoundError:
        return  # nothing cached
    problem, result = _record_problem(raw)
    problem = problem or (check(result) if check else None)
    if problem:
        log.warning("cached result %s not used (%s): recomputing it", uri.rsplit("/", 1)[-1], problem)
        storage.remove(uri)


def _no_objects(obj: dict) -> dict:
    """JSON object hook: Prefect's decoder would import and build the class an object names; refuse those."""
    if "__class__" in obj or "__exc_type__" in obj:
        raise ValueError("names a Python class")
    return obj


def _record_problem(raw: bytes) -> tuple[str | None, object]:
    """(what is wrong with a result record, its result as plain JSON)."""
    try:
        record = json.loads(raw)
        serializer, result = record["metadata"]["serializer"], json.loads(record["result"], object_hook=_no_objects)
    except (ValueError, KeyError, TypeError):
        return "not a plain JSON result record", None
    if serializer != _JSON_SERIALIZER:
        return "its record names another serializer than plain JSON", None
    return None, result


def _shard_problem(stage_uri: str, result, run_id: str) -> str | None:
    if (not isinstance(result, dict) or not set(result) <= _SHARD_FIELDS
            or not all(isinstance(v, (str, int, type(None))) for v in result.values())):
        return "its record is not a shard result"
    return manifest.shard_files_problem(stage_uri, result, _listed_images(stage_uri, run_id))


@functools.lru_cache(maxsize=16)
def _listed_images(stage_uri: str, run_id: str) -> frozenset[str]:
    """The file names in a stage's images/ folder: listed once per run, not one lookup per image."""
    return manifest.image_names(stage_uri)


def result_storage(stage_uri: str):
    """Persist task results beside the stage's data, so deleting the output also drops the cache.

    Prefect takes a local folder as a Path; remote storage must be a block saved on the API. The block
    writes through :class:`ResultFilesystem`.
    """
    base = storage.join(stage_uri, RESULTS_FOLDER)
    if storage.is_local(base):
        return Path(storage.normalize(base))
    block = RemoteFileSystem(basepath=base, settings=storage.fs_options(base))
    block.save(f"bfr-curate-results-{hashlib.sha256(base.encode()).hexdigest()[:16]}", overwrite=True)
    block._filesystem = ResultFilesystem(base)
    return block


class ResultFilesystem:
    """The filesystem of Prefect's remote result storage: :func:`storage.filesystem`'s (timeouts, retry
    bound), with two changes. ``makedirs`` does nothing: object stores have no folders, and s3fs's would
    create a missing bucket. Once the store failed in this process, every call fails at once (Prefect
    persists a failed task's exception too, and would wait out the timeouts again for each shard)."""

    def __init__(self, uri: str):
        self._uri = uri
        self._fs = storage.filesystem(uri)[0]

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        pass

    def __getattr__(self, name: str):
        if name in ("_uri", "_fs") or name.startswith("__"):  # not set yet: being unpickled on a Dask node
            raise AttributeError(name)
        error = storage.failed(self._uri)
        if error is not None:
            raise storage.StoreError(str(error))
        return getattr(self._fs, name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return configure_backends(torch.device("cuda"))
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available (use --device cpu)")
    return configure_backends(dev)


def on_dask_worker() -> bool:
    """True inside a Dask worker: the cluster bounds GPU work itself (GPU resources), no Prefect limit."""
    if "distributed" not in sys.modules:  # never imported: not a worker (and no import cost here)
        return False
    from distributed import get_worker

    try:
        get_worker()
        return True
    except ValueError:
        return False


def device_name(device: torch.device) -> str:
    """One name per device of a machine: "cuda" is cuda:0, named "cuda0" like it."""
    return f"{device.type}{device.index or 0}"


def gpu_limit_name(device: torch.device) -> str:
    """One limit per host and device: two GPUs, or two hosts sharing a Prefect server, never share a slot."""
    return f"{GPU_LIMIT_PREFIX}-{socket.gethostname()}-{device_name(device)}"


@contextmanager
def host_gpu_slot(device: str):
    """Hold this host's one slot of ``device`` while a stage's shards or a training run work in this process:
    two commands on one host never share a GPU, they take turns a stage (or a training run) at a time. Entered
    by the flow, once per stage: one API round trip. Nothing on the CPU, or when the work runs on Dask (its
    workers' GPU resources bound them)."""
    dev = None if uses_dask() else resolve_device(device)
    if dev is None or dev.type == "cpu":
        yield
        return
    with host_slot(gpu_limit_name(dev)):
        yield


_HELD: dict[str, int] = {}  # host slots this process holds (or is waiting for), with how many times entered
_HELD_GUARD = threading.Lock()


@contextmanager
def host_slot(name: str):
    """Hold the one slot of the Prefect global concurrency limit ``name`` (created here with one slot).
    Re-entrant within the process: a clean round's training run (a subflow) works inside the clean command's
    own slot instead of waiting for it."""
    with _HELD_GUARD:
        nested = name in _HELD
        _HELD[name] = _HELD.get(name, 0) + 1
    try:
        if nested:
            yield
        else:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                client.upsert_global_concurrency_limit_by_name(name, 1)
            with concurrency(name, occupy=1):
                yield
    finally:
        with _HELD_GUARD:
            _HELD[name] -= 1
            if not _HELD[name]:
                del _HELD[name]


_TURNS: dict[str, threading.Lock] = {}  # one per device of this process
_TURNS_GUARD = threading.Lock()


@contextmanager
def device_turn(device: torch.device):
    """One batch's device work, for the stages that run a large network on each batch (pseudo-targets, clean,
    restore; the first two size their batch from free device memory): their shard threads in this process take
    turns on a GPU batch by batch, so one such batch is on it at a time, while the other shards decode, encode
    and write. Nothing on the CPU, where each shard has its own cores."""
    if device.type == "cpu":
        yield
        return
    with _TURNS_GUARD:
        turn = _TURNS.setdefault(device_name(device), threading.Lock())
    with turn:
        yield


def uses_dask() -> bool:
    """True when the current flow submits its tasks to a Dask cluster."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context is not None and type(context.task_runner).__name__ == "DaskTaskRunner"


def local_device(device: str) -> torch.device:
    """The device for the work a flow does itself (checks, set-level FID). On Dask the shard tasks resolve
    ``device`` on their worker; a driver without that device works on the CPU."""
    try:
        return resolve_device(device)
    except ValueError:
        if uses_dask():
            return torch.device("cpu")
        raise
