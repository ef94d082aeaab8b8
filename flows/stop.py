"""SIGTERM and SIGINT stop a run promptly, with one line and exit code 1.

The first signal raises :class:`Interrupted` in the main thread: nothing more is submitted and the run
unwinds. Once a stage has released its folder (:func:`abandon_on_stop`) the process exits at once,
abandoning the shards in flight: their files are written atomically, so none shows half-written, and a
rerun redoes them (Prefect would otherwise wait for each to finish: a minute or more). If the process is
still alive ``BFR_CURATE_STOP_GRACE`` seconds after the signal (default 10: a release stuck on a hung
store), it exits anyway. A second signal exits at once.

Before such an exit, the flow run the signal interrupted, its parents (a recipe's run) and their task runs
still in flight are set Crashed with the same line (:func:`_mark_crashed`), as Prefect does for a run a
KeyboardInterrupt ends: the Prefect UI would otherwise show them Running forever.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager

from bfr_models import storage

PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect.flow_engine",
                       "prefect.task_engine", "prefect.results")

STOP_SERVER_S = 1  # how long a stopped command waits for its API server to stop before killing it
MARK_CRASHED_S = 3  # how long a stopped command spends at most setting its runs Crashed
_said = threading.Event()  # the one line was printed
_signalled = threading.Event()
_children = []  # processes this command started that must not outlive it (schedule's Prefect server)
_released = threading.Event()  # a stage stopped by the signal released its folder: nothing left to wait for
_interrupted: dict = {}  # the flow run the signal interrupted: {"id": UUID, "api": its PREFECT_API_URL or None}


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so Prefect marks the run crashed, not failed)."""


def stop_grace() -> float:
    return float(os.environ.get("BFR_CURATE_STOP_GRACE", "10"))


def message(name: str) -> str:
    return f"bfr-curate: stopped by {name}; finished shards are kept, rerun to resume"


def say_stopped(name: str) -> None:
    """Print the one line, once."""
    _say_once(message(name))


def _say_once(text: str) -> None:
    if not _said.is_set():
        _said.set()
        print(text, file=sys.stderr, flush=True)


def _exit_now(name: str) -> None:
    exit_now(message(name))


def stop_on_exit(process) -> None:
    """Terminate ``process`` (a subprocess.Popen) too when :func:`exit_now` ends this one."""
    _children.append(process)


def exit_now(text: str) -> None:
    """End the process at once with exit code 1 and one line (unless one was printed already), from any thread."""
    _say_once(text)
    if _interrupted:
        marking = threading.Thread(target=_mark_crashed, args=(text.removeprefix("bfr-curate: "),), daemon=True)
        marking.start()
        marking.join(MARK_CRASHED_S)
    from flows.api_server import end_process, remove_certificate_file, stop

    # the Prefect API servers are child processes: do not orphan them, nor wait long for them
    for child in _children:
        end_process(child, STOP_SERVER_S)
    stop(wait=STOP_SERVER_S)
    prefect_server = sys.modules.get("prefect.server.api.server")  # Prefect's own, if this process started one
    for server in list(prefect_server.SubprocessASGIServer._instances.values()) if prefect_server else []:
        end_process(server.server_process, STOP_SERVER_S)
    remove_certificate_file()  # os._exit skips the exit handlers that would
    os._exit(1)


def _exit_when_released(name: str) -> None:
    _released.wait(stop_grace())
    _exit_now(name)


def _note_interrupted_run() -> None:
    """Remember the flow run running in this (the main) thread, and the API it reports to."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        _interrupted.update(id=context.flow_run.id, api=PREFECT_API_URL.value())


def _mark_crashed(message: str) -> None:
    """Set the interrupted flow run, its parent runs, and their task runs still in flight Crashed."""
    from contextlib import nullcontext

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState,
                                                TaskRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    live = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
        any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])))
    api = _interrupted["api"]
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}) if api else nullcontext(), \
                get_client(sync_client=True, httpx_settings={"timeout": MARK_CRASHED_S}) as client:
            run_id = _interrupted["id"]
            while run_id is not None:
                runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
                # the server takes a filter only with a sort and a limit (at most 200); a run has far fewer
                # tasks in flight (the in-flight bound, flows/stage.py)
                for task_run in client.read_task_runs(flow_run_filter=runs, task_run_filter=live,
                                                      sort=TaskRunSort.ID_DESC, limit=200):
                    client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                parent = client.read_flow_run(run_id).parent_task_run_id
                run_id = client.read_task_run(parent).flow_run_id if parent else None
    except Exception:  # noqa: BLE001 - the stop goes on; the run's state is all that is left behind
        pass


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _signalled.is_set():
        _exit_now(name)
    _signalled.set()
    if "prefect" in sys.modules:  # a flow may be running (commands that run none never import Prefect)
        _note_interrupted_run()
    threading.Thread(target=_exit_when_released, args=(name,), daemon=True).start()
    raise Interrupted(name)


@contextmanager
def abandon_on_stop():
    """Around a stage's lease: when a stop signal unwinds the stage, the command exits as soon as the lease
    is released, without waiting for the shards in flight."""
    try:
        yield
    except Interrupted:
        _released.set()
        raise


def _unexplained(record: logging.LogRecord) -> bool:
    """Drop Prefect's run logs (tracebacks of every shard) when the run ends for a reason the CLI prints
    as one line: a failed store, a stop signal, a folder leased by another run."""
    from bfr_models.lease import LeaseBusy

    error = record.exc_info[1] if record.exc_info else None
    return not (_signalled.is_set() or storage.any_failed() or isinstance(error, LeaseBusy))


def install_stop_handlers() -> None:
    """Call once in the CLI process, from the main thread, before the run starts."""
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    for name in PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(_unexplained)


def reclaim_sigterm() -> None:
    """Inside a flow run: Prefect swaps in its own SIGTERM handler for the run (and hands the signal on
    only after its teardown, which waits for every shard in flight); put ours back if the CLI installed it.
    Prefect restores ours when the run ends."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is _on_signal:
        signal.signal(signal.SIGTERM, _on_signal)
