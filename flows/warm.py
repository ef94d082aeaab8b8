"""Networks loaded while Prefect starts.

Between planning its inputs and its first shard task, a console command mostly waits: for the temporary API
server to start, then for the server to create the flow and task runs (1-2 s on 2 cores, one core idle). A
stage whose shard tasks run in the command's own process (the thread pool, not Dask) loads their networks in
that time, on a thread of its own: MUSIQ, for one, takes 1.5-2 s to import and build. The shard tasks then
find them in their ``load_once`` caches (a task that asks first waits for the load under the same lock). A
load that fails here is dropped: the task loads again and reports its own error. Before the networks it
imports what Prefect imports as the first flow run starts, and after them pandas, which every stage's end
imports (pyarrow's first array, the summary table): 0.3 s more off the end.

Only the console command warms (:func:`enable`); a Python caller running several commands in one process (the
tests) loads in its tasks as before. Only on the CPU: a GPU's memory belongs to the command holding the host's
GPU slot (``tasks.runtime.host_gpu_slot``), and a network loaded early would take it before the slot is ours."""

from __future__ import annotations

import threading
from typing import Callable

_enabled = False


def enable() -> None:
    """This process is the console command: warm its stage's networks."""
    global _enabled
    _enabled = True


def warm_in_background(dask: str | None, device: str, load: Callable | None, *args) -> None:
    """``load(*args)`` (None: nothing to load), then pandas, on a thread of its own, when enabled and the shard
    tasks run here (``dask`` is None) on the CPU."""
    if _enabled and dask is None and _on_cpu(device):
        threading.Thread(target=_warm, args=(load, *args), name="bfr-warm", daemon=True).start()


def _on_cpu(device: str) -> bool:
    from tasks.runtime import resolve_device

    try:
        return resolve_device(device).type == "cpu"
    except ValueError:  # a device this machine lacks: the command says so in its own words
        return False


def _warm(load: Callable | None, *args) -> None:
    try:
        _import_flow_start()
        if load is not None:
            load(*args)
    except Exception:  # the flow imports for itself, the shard task loads again and reports its own error
        pass
    import pandas  # noqa: F401


def _import_flow_start() -> None:
    """The modules Prefect imports as the first flow run starts (0.15-0.2 s here: FastAPI's JSON encoder for the
    parameters, the flow and task engines, the graph tracker): imported while the command waits for its server."""
    import fastapi.encoders  # noqa: F401
    import prefect.flow_engine  # noqa: F401
    import prefect.task_engine  # noqa: F401
    import prefect.utilities.visualization  # noqa: F401
