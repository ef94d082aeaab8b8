"""A lease on a stage folder, so two runs never write the same stage at once (local disk and S3).

The lease is one small JSON object in the folder: owner (``host:pid``), a token (uuid), when it was taken
and when it expires. It is created exclusively (``O_EXCL`` on disk, ``If-None-Match: *`` on S3) and read
back to check the token, renewed while the run lives and deleted at its end. A lease that expired, or whose
owner is a dead process on this host (a killed run), is taken over. A second run waits up to
``BFR_CURATE_LEASE_WAIT`` seconds (default 0) for it, then refuses with one line.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from bfr_models import storage

LEASE_NAME = ".bfr-curate-lease.json"


class LeaseBusy(RuntimeError):
    """Another live run holds the lease of this folder."""


def lease_ttl() -> float:
    return float(os.environ.get("BFR_CURATE_LEASE_TTL", "120"))


def lease_wait() -> float:
    return float(os.environ.get("BFR_CURATE_LEASE_WAIT", "0"))


def _read(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except ValueError:  # a torn or foreign file: nobody holds it
        return {}


def _owner_dead(record: dict) -> bool:
    """The owner is a process of this host that no longer exists (a killed run)."""
    host, _, pid = record.get("owner", "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _stale(record: dict) -> bool:
    return not record or record.get("expires", 0) < time.time() or _owner_dead(record)


def _create(uri: str, data: bytes) -> bool:
    """Write ``data`` only if no lease object exists; False when another run got there first."""
    fs, path = storage.filesystem(uri)
    try:
        if storage.is_local(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        else:
            fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as e:
        if "PreconditionFailed" in str(e) or "Precondition" in type(e).__name__:
            return False
        raise
    return True


class Lease:
    def __init__(self, folder: str):
        self.folder = folder
        self.uri = storage.join(folder, LEASE_NAME)
        self.token = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "since": self.since,
                           "expires": time.time() + lease_ttl()}).encode()

    def acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            current = _read(self.uri)
            if current is not None and _stale(current):
                storage.remove(self.uri)  # taken over; a racing taker is caught by the read-back below
                current = None
            if current is None and _create(self.uri, self._record()):
                if (_read(self.uri) or {}).get("token") == self.token:
                    return
            elif current is not None and time.monotonic() >= deadline:
                raise LeaseBusy(f"{self.folder} is being written by {current.get('owner')} since "
                                f"{current.get('since')}; wait or use another --out")
            time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def _renew(self) -> None:
        while not self._stop.wait(lease_ttl() / 3):
            try:
                if (_read(self.uri) or {}).get("token") == self.token:
                    storage.write_bytes_atomic(self.uri, self._record())
            except Exception:  # a failing store fails the run itself; the lease then just expires
                pass

    def release(self) -> None:
        self._stop.set()
        if storage.failed(self.uri):  # the store is down: do not wait on it, the lease expires by itself
            return
        try:
            if (_read(self.uri) or {}).get("token") == self.token:
                storage.remove(self.uri)
        except Exception:
            pass


@contextmanager
def hold(folder: str, wait: float | None = None):
    """Hold the lease of ``folder`` for the body: renewed while it runs, released after it."""
    lease = Lease(folder)
    lease.acquire(lease_wait() if wait is None else wait)
    threading.Thread(target=lease._renew, name="bfr-curate-lease", daemon=True).start()
    try:
        yield lease
    finally:
        lease.release()
