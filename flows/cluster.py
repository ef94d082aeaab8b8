"""Running on a remote Dask cluster: the multi-node contract, checked before any work.

Every node must reach everything a task touches. So with ``--dask tcp://...``: every path a command names
(``--out``, inputs, priors, models, references) is a URL (``s3://...``), every process reports to one Prefect
server (``PREFECT_API_URL``: without it each worker would start its own embedded API, and the task runs, result
storage blocks and caches of one node would be invisible to the others) and the model cache is a URL too
(``BFR_CURATE_MODEL_CACHE=s3://...``; each worker pulls what it needs into a local temp folder, hash-checked).
A violation is one line naming the local path or the setting.
"""

from __future__ import annotations

import os
from pathlib import Path

# parameters (of a command, or inside a recipe) that name a file, folder or URL the tasks read or write
PATH_PARAMETERS = frozenset({"input", "out", "photos", "uri", "reference", "fid_ref", "prior", "restorer", "model",
                             "init", "targets", "real", "pairs", "compare"})
SHARED_SETTINGS = ("PREFECT_API_URL", "BFR_CURATE_MODEL_CACHE")  # must be the same on every node


class ClusterContractError(ValueError):
    """A command that cannot run on a multi-node cluster as given. One line."""


def is_remote(address: str | None) -> bool:
    """A cluster of other machines: ``--dask tcp://...`` (``local`` is a LocalCluster of this machine)."""
    return address not in (None, "local")


def local_paths(params: dict) -> list[str]:
    """The values of :data:`PATH_PARAMETERS` in ``params`` (and the mappings in it, a recipe's stages) that are
    paths of this machine: ``out`` always when local, any other when it exists here (a model card name, a
    built-in restorer or ``demo`` are not paths)."""
    from bfr_models import storage

    found = []
    for key, value in params.items():
        if isinstance(value, dict):
            found += local_paths(value)
        elif key in PATH_PARAMETERS:
            for uri in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(uri, str) and storage.is_local(uri) and (key == "out" or Path(uri).expanduser().exists()):
                    found.append(uri)
    return found


def check_contract(address: str, params: dict) -> None:
    """Before any work: paths, the Prefect server and the model cache suit a cluster of several machines."""
    from prefect.settings import PREFECT_API_URL

    from bfr_models import models, storage

    paths = local_paths(params)
    if paths:
        raise ClusterContractError(
            f"--dask {address}: {storage.normalize(paths[0])} is a path on this machine, which the cluster's other "
            f"nodes cannot reach; give a URL every node reaches (s3://bucket/...)")
    if not PREFECT_API_URL.value():
        raise ClusterContractError(
            f"--dask {address}: PREFECT_API_URL is not set, so every node would run its own embedded Prefect API; "
            f"start one server (prefect server start --host 0.0.0.0) and set PREFECT_API_URL=http://<host>:4200/api "
            f"on this machine and every worker")
    if models.shared_cache() is None:
        raise ClusterContractError(
            f"--dask {address}: the model cache {models.model_cache_dir()} is a folder of this machine; set "
            f"BFR_CURATE_MODEL_CACHE to a URL every node reaches (s3://bucket/models) on this machine and every worker")
    _check_workers(address)


def worker_settings() -> dict:
    """Run on each worker: its values of :data:`SHARED_SETTINGS` (never credentials)."""
    return {name: os.environ.get(name) for name in SHARED_SETTINGS}


def _check_workers(address: str) -> None:
    """The workers connected now report to the same Prefect server and model cache as this machine (workers that
    join later, an adaptive cluster's, are not seen here)."""
    from distributed import Client

    try:
        with Client(address, timeout=30) as client:
            answers = client.run(worker_settings)
    except OSError as e:  # refused, unreachable, timed out
        raise ClusterContractError(f"--dask {address}: no Dask scheduler answers there ({type(e).__name__}: {e})"
                                   ) from None
    mine = worker_settings()
    for worker, theirs in sorted(answers.items()):
        for name in SHARED_SETTINGS:
            if theirs[name] != mine[name]:
                raise ClusterContractError(
                    f"--dask {address}: worker {worker} has {name}={theirs[name] or '(unset)'}, this machine "
                    f"{mine[name]}; start every worker with the same {name}")


def check_device(device: str, address: str | None) -> None:
    """Check ``--device`` before any work. On a remote cluster only its form: the workers resolve it (``auto``
    too), and this machine may have no GPU at all."""
    import torch

    from tasks.runtime import resolve_device

    if not is_remote(address):
        resolve_device(device)
    elif device != "auto":
        try:
            torch.device(device)
        except RuntimeError as e:
            raise ClusterContractError(f"--device {device}: {e}") from None
