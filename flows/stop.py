"""SIGTERM and SIGINT stop a run promptly, with one line and exit code 1.

The first signal raises :class:`Interrupted` in the main thread: nothing more is submitted and the run
unwinds. Shards in flight may finish; their files are written atomically, so none shows half-written.
If the process is still alive ``BFR_CURATE_STOP_GRACE`` seconds later (default 10: a shard stuck on a
hung store), it exits anyway, abandoning them. A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from bfr_models import storage

PREFECT_RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect.flow_engine",
                       "prefect.task_engine", "prefect.results")

_said = threading.Event()  # the one line was printed
_signalled = threading.Event()


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (a KeyboardInterrupt, so Prefect marks the run crashed, not failed)."""


def stop_grace() -> float:
    return float(os.environ.get("BFR_CURATE_STOP_GRACE", "10"))


def message(name: str) -> str:
    return f"bfr-curate: stopped by {name}; finished shards are kept, rerun to resume"


def say_stopped(name: str) -> None:
    """Print the one line, once."""
    if not _said.is_set():
        _said.set()
        print(message(name), file=sys.stderr, flush=True)


def _exit_now(name: str) -> None:
    say_stopped(name)
    from flows.api_server import stop

    stop()  # the command's early API server (flows/api_server.py) is a child process: do not orphan it
    try:  # nor Prefect's own temporary API server
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    except Exception:
        pass
    os._exit(1)


def _on_signal(signum, frame) -> None:
    name = signal.Signals(signum).name
    if _signalled.is_set():
        _exit_now(name)
    _signalled.set()
    timer = threading.Timer(stop_grace(), _exit_now, args=(name,))
    timer.daemon = True
    timer.start()
    raise Interrupted(name)


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
