"""What a stage works on: input items, stable shards and their cache keys."""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from pathlib import Path

from bfr_models import manifest, storage


def _code_version() -> str:
    """Hash of the science and task code: a change to either invalidates every cache."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for package in ("bfr_models", "tasks"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = _code_version()


def stable_hash(obj, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class InputItem:
    uri: str
    version: str  # changes when the content changes (sha256, ETag or size-mtime)
    parent_id: str | None = None  # image_id of the manifest row it came from
    split: str | None = None
    row: str | None = None  # the whole manifest row as JSON, for stages that annotate rows (score)
    reference: str | None = None  # URI of the image it is compared with (full-reference metrics)
    name: str | None = None  # a folder's file: its name relative to the folder (its id derives from it)
    duplicate_of: str | None = None  # a folder's file byte-identical to an earlier one: that one's id
    source_name: str | None = None  # the original file's name without extension, carried down the lineage


@dataclass(frozen=True)
class ShardSpec:
    stage: str
    key: str  # cache key: stage + config + inputs + code version
    items: tuple[InputItem, ...]


def list_inputs(uri: str, exclude: tuple[str, ...] | list[str] = ()) -> tuple[list[InputItem], int]:
    """Items of a manifest (its ok rows) or of a folder (every file: what is not an image becomes an
    error row); also how many were skipped (a manifest's error rows; a folder's dotfiles and ``exclude``
    matches)."""
    if manifest.is_manifest(uri):
        if exclude:
            raise ValueError(f"--exclude applies to folder inputs; {uri} is a manifest")
        df = manifest.read_manifest(uri)
        ok = df[df["status"] == "ok"]
        items = [
            InputItem(uri=r.uri, version=r.sha256, parent_id=r.image_id, split=r.split,
                      source_name=getattr(r, "source_name", None))  # absent in manifests written before it
            for r in ok.itertuples(index=False)
        ]
        return sorted(items, key=lambda i: (i.uri, i.parent_id or "")), len(df) - len(ok)
    files, skipped = storage.list_files(uri, exclude)
    first = _duplicates(files)
    items = []
    for f in files:
        dup = first.get(f.uri)  # in the version too, so a shard's cache key sees it
        items.append(InputItem(uri=f.uri, version=f.version if dup is None else f"{f.version} duplicate_of:{dup}",
                               name=f.name, duplicate_of=dup, source_name=source_name(f.name)))
    return items, skipped


def source_name(name: str) -> str:
    """A folder file's name as users know it: its path relative to the folder, without the extension."""
    return posixpath.splitext(name)[0]


def _duplicates(files: list[storage.ListedFile], batch: int = 64) -> dict[str, str]:
    """URI -> image_id of the first (by URI) byte-identical file, for every later copy.

    Only files that share their size with another are read (and hashed) here, a batch at a time.
    """
    from tasks.rows import digest_id

    by_size: dict[int, list[storage.ListedFile]] = {}
    for f in files:
        by_size.setdefault(f.size, []).append(f)
    candidates = [f for group in by_size.values() if len(group) > 1 for f in group]
    digests = {}
    for start in range(0, len(candidates), batch):
        chunk = read_many([f.uri for f in candidates[start : start + batch]])
        digests.update({u: storage.sha256_hex(d) for u, d in chunk.items() if isinstance(d, bytes)})
    first: dict[str, str] = {}  # sha256 -> id of its first file
    out = {}
    for f in sorted(candidates, key=lambda f: f.uri):
        if f.uri in digests:
            if digests[f.uri] in first:
                out[f.uri] = first[digests[f.uri]]
            else:
                first[digests[f.uri]] = digest_id(digests[f.uri], f.name)
    return out


def make_shards(stage: str, config: dict, items: list[InputItem], shard_size: int) -> list[ShardSpec]:
    """Split sorted items at content-defined boundaries.

    A shard ends where the hash of an item's URI is 0 mod ``shard_size`` (or at twice the
    size), so adding images changes only the shards they land in: the others keep their
    keys and stay cached.
    """
    config_hash = stable_hash(config)
    shards, current = [], []
    for item in items:
        current.append(item)
        boundary = int(hashlib.sha256(item.uri.encode()).hexdigest()[:8], 16) % shard_size == 0
        if boundary or len(current) >= 2 * shard_size:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return [
        ShardSpec(
            stage=stage,
            key=stable_hash([stage, config_hash, CODE_VERSION, [(i.uri, i.version, i.parent_id, i.reference) for i in s]]),
            items=tuple(s),
        )
        for s in shards
    ]


def derived_seed(seed: int, *parts: str) -> int:
    """A per-image seed that depends on the run seed and the image, not on batch or order."""
    return int(hashlib.sha256(":".join([str(seed), *parts]).encode()).hexdigest()[:15], 16)


def read_many(uris: list[str]) -> dict[str, bytes | Exception]:
    """Fetch many files concurrently (one batched call per filesystem); errors are returned."""
    out: dict[str, bytes | Exception] = {}
    by_fs: dict[str, list[tuple[str, str]]] = {}
    fss = {}
    for uri in uris:
        fs, path = storage.filesystem(uri)
        key = type(fs).__name__
        fss[key] = fs
        by_fs.setdefault(key, []).append((uri, path))
    for key, pairs in by_fs.items():
        got = fss[key].cat([p for _, p in pairs], on_error="return")
        for uri, path in pairs:
            value = got.get(path, FileNotFoundError(path)) if isinstance(got, dict) else got
            out[uri] = value
    return out
