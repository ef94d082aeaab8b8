"""Prefect plumbing shared by every shard task: cache keys, result storage, GPU slots."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect.concurrency.sync import concurrency
from prefect.filesystems import RemoteFileSystem

from bfr_models import storage

GPU_LIMIT_PREFIX = "bfr-curate-gpu"


def shard_cache_key(context, parameters) -> str:
    """Cache key of a shard task: the shard's own key (stage, config, inputs, code version)."""
    return parameters["spec"].key


def key_parameter(context, parameters) -> str:
    """Cache key of a task whose caller computed it and passes it as ``key`` (training, searches)."""
    return parameters["key"]


def result_storage(stage_uri: str):
    """Persist task results beside the stage's data, so deleting the output also drops the cache.

    Prefect takes a local folder as a Path; remote storage must be a block saved on the API. The block
    writes through :class:`ResultFilesystem`.
    """
    base = storage.join(stage_uri, "_prefect")
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
        error = storage.failed(self._uri)
        if error is not None:
            raise storage.StoreError(str(error))
        return getattr(self._fs, name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available (use --device cpu)")
    return dev


def gpu_limit_name(device: torch.device) -> str:
    return f"{GPU_LIMIT_PREFIX}-{device.type}{device.index or 0}"


@contextmanager
def device_slot(device: torch.device):
    """Hold one slot of the device's Prefect concurrency limit while computing on a GPU."""
    if device.type == "cpu":
        yield
        return
    with concurrency(gpu_limit_name(device), occupy=1):
        yield


def ensure_gpu_limit(device: torch.device, slots: int = 1) -> None:
    """Create (or resize) the device's global concurrency limit so one GPU is not oversubscribed."""
    if device.type == "cpu":
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(gpu_limit_name(device), slots)
