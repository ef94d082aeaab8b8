"""What the command line says when a command fails: one line and an exit code (2: the user can fix it; 1: the
run failed), and Prefect's own error logs kept off the terminal so that line is all the user sees."""

from __future__ import annotations

import logging
import sys


class UserError(Exception):
    """A bad argument, config or missing file: printed as one line, exit code 2."""


USER_OSERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def explain(error: BaseException) -> tuple[int, str]:
    """(exit code, one-line message) for an exception that reached the command line.

    2: the user can fix it (argument, config, missing or wrong input, no credentials, unwritable --out);
    1: the run failed (a stage, the store). An exception may carry its own ``exit_code``.
    """
    import pickle

    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    from bfr_models.lease import LeaseBusy
    from bfr_models.storage import StoreError
    from flows.api_server import APIServerError

    stage = sys.modules.get("flows.stage")  # no stage ran if it was never imported (it imports torch and Prefect)
    stage_error = stage.StageError if stage else ()
    if isinstance(error, (StoreError, LeaseBusy, APIServerError)):  # the message says what failed, and why
        code, text = 1, str(error)
    elif isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        code, text = 2, ("no S3 credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or AWS_PROFILE) for the store")
    elif isinstance(error, BotoCoreError):
        code, text = 1, f"store: {error}"
    elif isinstance(error, pickle.UnpicklingError):
        # torch's own message suggests turning its safety off: never repeat that
        code, text = 2, "not a weights file (only plain tensors are loaded; nothing is unpickled)"
    elif isinstance(error, OSError) and error.strerror and error.filename:
        code, text = (2 if isinstance(error, USER_OSERRORS) else 1), f"{error.filename}: {error.strerror}"
    elif isinstance(error, (UserError, ValueError, *USER_OSERRORS)):
        code, text = 2, str(error)
    elif isinstance(error, OSError):
        code, text = 1, f"store: {type(error).__name__}: {error}"
    elif isinstance(error, stage_error):
        code, text = 1, str(error)
    else:  # a bug: say what, and how to see where
        code, text = 1, f"{type(error).__name__}: {error} (bfr-curate --debug ... prints the traceback)"
    code = getattr(error, "exit_code", code)
    return code, " ".join(text.split())  # one line, whatever the library put in its message


# Prefect logs a flow's or task's exception (with its traceback) at ERROR before re-raising it to us.
class _NoRunErrors(logging.Filter):
    """Drops Prefect's ERROR records about a failed run: the command line explains the error itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def quiet_prefect_errors() -> None:
    """Filters on Prefect's run loggers; Prefect's logging setup (dictConfig) keeps them, so Prefect need not be
    imported here: commands that run no flow (manifest show, presets, ...) never load it."""
    from flows.stop import PREFECT_RUN_LOGGERS

    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoRunErrors) for f in logger.filters):
            logger.addFilter(_NoRunErrors())
