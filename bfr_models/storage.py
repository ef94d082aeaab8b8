"""One place that turns URIs into fsspec filesystems and writes files atomically.

Local paths and any fsspec URL (``s3://``, ``memory://``, ...) work the same way.
Credentials and endpoints come from the usual fsspec/AWS environment
(``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ``FSSPEC_S3_*``) and are never logged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import uuid
from dataclasses import dataclass

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")


def filesystem(uri: str):
    """Return ``(fs, path)`` for a URI or local path."""
    return url_to_fs(uri)


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
    """Write a whole file or nothing: temp name + rename locally, one PUT on object stores."""
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
    else:
        fs.pipe_file(path, data)


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
