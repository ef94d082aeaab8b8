"""What a stage works on: input items, stable shards and their cache keys."""

from __future__ import annotations

import hashlib
import json
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


@dataclass(frozen=True)
class ShardSpec:
    stage: str
    key: str  # cache key: stage + config + inputs + code version
    items: tuple[InputItem, ...]


def list_inputs(uri: str) -> tuple[list[InputItem], int]:
    """Items of a manifest (its ok rows) or of a folder of images; also how many rows were skipped."""
    if manifest.is_manifest(uri):
        df = manifest.read_manifest(uri)
        ok = df[df["status"] == "ok"]
        items = [
            InputItem(uri=r.uri, version=r.sha256, parent_id=r.image_id, split=r.split)
            for r in ok.itertuples(index=False)
        ]
        return sorted(items, key=lambda i: (i.uri, i.parent_id or "")), len(df) - len(ok)
    files = storage.list_images(uri)
    return [InputItem(uri=f.uri, version=f.version) for f in files], 0


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
