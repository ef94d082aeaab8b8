"""One place that turns URIs into fsspec filesystems and writes files atomically.

Local paths and any fsspec URL (``s3://``, ``memory://``, ...) work the same way.
Credentials and endpoints come from the usual fsspec/AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``FSSPEC_S3_*``) and are never logged.

A store that fails, fails fast: S3 requests have connect/read timeouts (``BFR_CURATE_STORE_TIMEOUT`` seconds,
default 6) and at most ``BFR_CURATE_STORE_ATTEMPTS`` attempts (default 3, botocore's "standard" retry mode:
exponential backoff with jitter, for throttling, 5xx and connection errors), so one request gives up after
about attempts x timeout. A failed write raises :class:`StoreError`; later writes to the same store then fail
at once (nothing keeps computing shards for a dead store). Nothing here ever creates a bucket.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import os
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.implementations.local import LocalFileSystem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


S3_PROTOCOLS = ("s3", "s3a")
PROBE_PREFIX = ".bfr-curate-probe-"


class StoreError(OSError):
    """A read or write of the output store failed (unreachable, timed out, denied, disk full).

    The message names the store (``scheme://bucket`` or the local folder, never credentials) and the cause.
    """


class OutNotWritable(ValueError):
    """``--out`` cannot be written (a file, a missing bucket, no permission): a user error, found before any work."""


def store_timeout() -> float:
    return float(os.environ.get("BFR_CURATE_STORE_TIMEOUT", "6"))


def store_attempts() -> int:
    return int(os.environ.get("BFR_CURATE_STORE_ATTEMPTS", "3"))


def s3_options() -> dict:
    """s3fs options: timeouts and bounded retries (a user's ``FSSPEC_S3_CONFIG_KWARGS`` wins)."""
    timeout = store_timeout()
    ours = {"connect_timeout": timeout, "read_timeout": timeout,
            "retries": {"total_max_attempts": store_attempts(), "mode": "standard"}}
    theirs = fsspec.config.conf.get("s3", {}).get("config_kwargs", {})
    return {"config_kwargs": {**ours, **theirs}}


def fs_options(uri: str) -> dict:
    """Options this project passes to fsspec for ``uri`` (timeouts and retries on S3)."""
    return s3_options() if split_protocol(uri)[0] in S3_PROTOCOLS else {}


def filesystem(uri: str):
    """Return ``(fs, path)`` for a URI or local path."""
    options = fs_options(uri)
    fs, path = url_to_fs(uri, **options)
    if options:  # s3fs retries timeouts itself on top of botocore's attempts (5 x 3 x timeout): botocore bounds it
        fs.retries = 1
        _send_bodies_at_once(fs)
    return fs, path


def _send_bodies_at_once(fs) -> None:
    """botocore makes every S3 PUT wait for "100 Continue" before sending its body, and aiohttp's read
    timeout does not cover that wait: a hung endpoint would hang the write forever. Our bodies are small."""
    from botocore.handlers import add_expect_header

    fs.s3.meta.events.unregister("before-call.s3", add_expect_header)


def store_name(uri: str) -> str:
    """What a message may say about a store: ``scheme://bucket`` or a local path, never credentials."""
    protocol, path = split_protocol(uri)
    if protocol in (None, "file", "local"):
        return normalize(uri)
    return f"{protocol}://{path.strip('/').split('/')[0]}"


def is_store_fault(exc: BaseException) -> bool:
    """One definition of a store failure: I/O, network, timeout and S3 service errors."""
    kinds: tuple = (OSError, TimeoutError, asyncio.TimeoutError)
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += (BotoCoreError, ClientError)
    except ImportError:  # no S3 support installed
        pass
    try:
        from aiohttp import ClientError as HttpError

        kinds += (HttpError,)
    except ImportError:
        pass
    return isinstance(exc, kinds)


_failed_stores: dict[str, StoreError] = {}  # store -> its first write failure in this process
_writing: dict = {}  # write in progress on an async filesystem's loop -> its store


def store_error(uri: str, exc: BaseException) -> StoreError:
    """Record that ``uri``'s store failed with ``exc``; returns the store's first failure.

    Writes to that store still waiting on it are cancelled: they would each wait out the timeouts again.
    """
    store = store_name(uri)
    error = StoreError(f"store {store} failed: {type(exc).__name__}: {exc}".splitlines()[0])
    first = _failed_stores.setdefault(store, error)
    for write, its_store in list(_writing.items()):
        if its_store == store:
            write.cancel()
    return first


def any_failed() -> bool:
    return bool(_failed_stores)


def failed(uri: str) -> StoreError | None:
    """The first write failure of ``uri``'s store in this process, if any."""
    return _failed_stores.get(store_name(uri))


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def normalize(uri: str) -> str:
    """Canonical form: absolute path for local files, ``proto://path`` otherwise."""
    fs, path = filesystem(uri)
    return _to_uri(fs, path)


def _to_uri(fs, path: str) -> str:
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def confined_join(base: str, relative) -> str:
    """``base`` joined with a relative path read from a file (an index, a recipe, a model folder's JSON).

    Refuses anything that could leave ``base``: absolute paths, URLs, ``..`` components, empty names.
    """
    parts = relative.replace("\\", "/").split("/") if isinstance(relative, str) else []
    if (not parts or relative.startswith(("/", "\\", "~")) or ":" in relative
            or any(p in ("", "..") for p in parts)):
        raise ValueError(f"{relative!r} is not a relative path inside {base}")
    return join(base, relative)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def file_sizes(folder_uri: str) -> dict[str, int]:
    """Name -> size of the files directly in a folder (one listing; empty if the folder is missing)."""
    fs, path = filesystem(folder_uri)
    fs.invalidate_cache(path)  # object stores cache listings; files may have been written by other processes
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
            for e in entries if e.get("type") == "file"}


def remove(uri: str) -> None:
    """Delete a file; one already gone is fine."""
    fs, path = filesystem(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def isdir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.isdir(path)


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write a whole file or nothing: temp name + rename locally, one PUT on object stores.

    Raises :class:`StoreError` when the store fails, and at once for a store that already failed.
    """
    earlier = failed(uri)
    if earlier is not None:
        raise StoreError(str(earlier))
    try:
        _write(uri, data)
    except Exception as e:
        if is_store_fault(e):
            raise store_error(uri, e) from e
        raise


def _write(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):  # a failed write leaves nothing behind
                os.remove(tmp)
            raise
    elif getattr(fs, "async_impl", False):  # on fsspec's loop, so that a failure elsewhere can cancel it
        write = asyncio.run_coroutine_threadsafe(fs._pipe_file(path, data), fs.loop)
        _writing[write] = store_name(uri)
        try:
            write.result()
        except CancelledError as e:
            raise TimeoutError("cancelled: another write to this store failed") from e
        finally:
            _writing.pop(write, None)
    else:
        fs.pipe_file(path, data)


def check_writable(out: str) -> None:
    """Before any work: ``out`` must be writable; a probe object is written and deleted.

    A missing bucket is an error, never created (s3fs's ``mkdir``/``makedirs`` of a missing bucket would
    create it, and Prefect's result storage calls ``makedirs``). A store that answers again is trusted again.
    """
    _failed_stores.pop(store_name(out), None)
    fs, path = filesystem(out)
    if isinstance(fs, LocalFileSystem) and os.path.exists(path) and not os.path.isdir(path):
        raise OutNotWritable(f"--out {out} is a file, not a folder")
    protocol = split_protocol(out)[0]
    try:
        if protocol in S3_PROTOCOLS:
            bucket = path.strip("/").split("/")[0]
            try:
                fs.info(bucket)  # not exists(): that says False for missing credentials too
            except FileNotFoundError:
                raise OutNotWritable(f"bucket {bucket} does not exist (--out {out}); create it first, "
                                     "bfr-curate never creates buckets") from None
        probe = join(out, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        _write(probe, b"probe")
        remove(probe)
    except OutNotWritable:
        raise
    except Exception as e:
        if not is_store_fault(e):
            raise
        raise OutNotWritable(f"cannot write to --out {store_name(out)}: {type(e).__name__}: {e}".splitlines()[0]) from e


@dataclass(frozen=True)
class ListedFile:
    uri: str
    size: int
    version: str  # what changes when the content changes: ETag, or size + mtime
    name: str = ""  # the path relative to the listed folder, "/"-separated: the file's source name


def list_files(uri: str, exclude: tuple[str, ...] | list[str] = ()) -> tuple[list[ListedFile], int]:
    """Every file under a folder, recursively, sorted by URI; and how many were skipped.

    Skipped, and only these: dotfiles (any part of the relative name starting with ".", so dot-folders
    too) and files whose relative name or base name matches an ``exclude`` glob.
    """
    fs, root = filesystem(uri)
    if not fs.isdir(root):
        raise FileNotFoundError(f"input folder not found: {uri}")
    files, skipped = [], 0
    for path, info in fs.find(root, detail=True).items():
        name = path[len(root.rstrip("/")) + 1 :] if path.startswith(root.rstrip("/") + "/") else os.path.basename(path)
        if any(part.startswith(".") for part in name.split("/")) or _excluded(name, exclude):
            skipped += 1
            continue
        version = info.get("ETag") or info.get("etag") or f"{info.get('size')}-{info.get('mtime', info.get('LastModified', ''))}"
        files.append(ListedFile(_to_uri(fs, path), int(info.get("size") or 0), str(version).strip('"'), name))
    return sorted(files, key=lambda f: f.uri), skipped


def _excluded(name: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], g) for g in globs)


def list_images(uri: str) -> list[ListedFile]:
    """The image files (by extension) of a folder: reference sets (FID, --reference), not stage inputs."""
    return [f for f in list_files(uri)[0] if f.name.lower().endswith(IMAGE_EXTENSIONS)]
