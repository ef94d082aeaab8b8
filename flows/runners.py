"""How a command's flows run: a thread pool on this machine (``--workers``), or a Dask cluster (``--dask``:
a scheduler address, or ``local`` for a LocalCluster of worker processes started here). The flows and tasks
are the same either way; only the task runner handed to the flow changes."""

from __future__ import annotations

import logging
from contextlib import contextmanager


@contextmanager
def task_runner(workers: int, dask: str | None, debug: bool = False):
    """The task runner a command asked for: threads (default) or a Dask cluster.

    ``--dask local`` starts one LocalCluster here, so every flow of the command (a recipe's stages are
    subflows, each given a copy of this runner) submits to the same cluster instead of starting its own.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    if dask is None:
        yield ThreadPoolTaskRunner(max_workers=workers)
        return
    from prefect_dask import DaskTaskRunner

    if dask != "local":
        yield DaskTaskRunner(address=dask)
        return
    from distributed import LocalCluster

    if not debug:  # the scheduler and nannies log here, over the progress bar
        logging.getLogger("distributed").setLevel(logging.WARNING)
    with LocalCluster(**local_cluster_kwargs(workers, local_api_env())) as cluster:
        yield DaskTaskRunner(address=cluster.scheduler_address)


def local_api_env() -> dict:
    """``PREFECT_API_URL`` for LocalCluster workers: the server this command reports to. Without one, this
    process's embedded API is started now and shared with them: each worker process would otherwise start an
    embedded API of its own (tens of seconds each on its first shard). With it, the settings that make a task
    run cheaper to start on a worker (:func:`flows.api_server.worker_client_env`)."""
    from prefect.settings import PREFECT_API_URL

    from flows.api_server import worker_client_env

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the instance Prefect's own client starts and uses in this process
        server.start()
        url = server.api_url
    return {"PREFECT_API_URL": url, **worker_client_env(url)}


def local_cluster_kwargs(workers: int, env: dict | None = None) -> dict:
    """A Dask LocalCluster of worker processes, one task thread each; torch's threads in each by the rule of
    flows/threads.py (the cores divided among the workers), and ``env`` (e.g. :func:`local_api_env`)."""
    from flows.threads import worker_env

    return {"n_workers": workers, "threads_per_worker": 1, "processes": True, "silence_logs": logging.WARNING,
            "env": {**worker_env(workers), **(env or {})}}
