"""`bfr-curate gc`: remove from an output folder's stages what no current index references.

After a code or config change a stage folder keeps its old shard files, images, FID feature files and
Prefect results beside the new ones. Only files inside ``<stage>/<key>/{shards,images,fid,_prefect}/``
of a stage folder with an ``index.json`` are candidates; a folder with anything written after its index (a run
in progress, or an interrupted one to resume) is skipped whole, and so is any file newer than ``min_age_s``.
"""

from __future__ import annotations

import datetime as dt
import io
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from bfr_models import manifest, storage

KINDS = ("shards", "images", "fid", "_prefect")  # the folders a stage run writes files into


@dataclass
class StagePlan:
    folder: str
    remove: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, path, bytes)
    skipped: str | None = None

    def summary(self) -> str:
        counts = Counter(kind for kind, _, _ in self.remove)
        parts = [f"{counts[k]} {k}" for k in KINDS if counts[k]]
        return f"{', '.join(parts) or 'nothing'} ({sum(b for _, _, b in self.remove) / 1e6:.1f} MB)"


def _mtime(info: dict) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value) if value is not None else time.time()  # unknown age: treated as new, so kept


def _referenced_images(fs, folders: dict[str, dict]) -> set[str]:
    """Every image URI a current index's rows point at (their own images and their parents'), in any stage."""
    found = set()
    for folder, index in folders.items():
        for shard in index["shards"]:
            with fs.open(f"{folder}/{shard['path']}", "rb") as f:
                data = pq.ParquetFile(io.BytesIO(f.read()))
            columns = [c for c in ("uri", "parent_uri") if c in data.schema_arrow.names]
            for column in data.read(columns=columns).columns:
                found.update(u for u in column.to_pylist() if u)
    return found


def plan_gc(out: str, min_age_s: float = 600) -> list[StagePlan]:
    """What gc would remove in each stage folder under ``out`` (nothing is touched)."""
    fs, root = storage.filesystem(out)
    root = root.rstrip("/")
    folders = {}
    for path in sorted(fs.glob(f"{root}/*/*/{manifest.INDEX_NAME}")):
        folder = path.rsplit("/", 1)[0]
        folders[folder] = manifest.read_index(storage.normalize(fs.unstrip_protocol(folder)))
    images = _referenced_images(fs, folders)
    now = time.time()
    plans = []
    for folder, index in folders.items():
        plan = StagePlan(storage.normalize(fs.unstrip_protocol(folder)))
        plans.append(plan)
        files = fs.find(folder, detail=True)
        written = _mtime(files[f"{folder}/{manifest.INDEX_NAME}"])
        if any(_mtime(info) > written + 1 for info in files.values()):
            plan.skipped = "files newer than its index (a run in progress or interrupted): kept"
            continue
        shard_paths = {s["path"] for s in index["shards"]}
        shard_names = {s["name"] for s in index["shards"]}
        stale_shards, results = set(), []
        for path, info in sorted(files.items()):
            kind, _, name = path[len(folder) + 1:].partition("/")
            if kind not in KINDS or "/" in name or not path.startswith(root + "/") or now - _mtime(info) < min_age_s:
                continue
            size = int(info.get("size") or 0)
            if name.startswith(".") and name.endswith(".tmp"):  # left by an interrupted write
                plan.remove.append((kind, path, size))
            elif kind == "shards" and f"shards/{name}" not in shard_paths:
                plan.remove.append((kind, path, size))
                stale_shards.add(name.rsplit(".", 1)[0])
            elif kind == "images" and storage.normalize(fs.unstrip_protocol(path)) not in images:
                plan.remove.append((kind, path, size))
            elif kind == "fid" and name.rsplit(".", 1)[0] not in shard_names:
                plan.remove.append((kind, path, size))
            elif kind == "_prefect":
                results.append((path, name, size))
        # a shard task's result is named by its cache key, the shard's name; other tasks' results are kept
        plan.remove += [("_prefect", path, size) for path, name, size in results if name in stale_shards]
    return plans


def delete(out: str, plans: list[StagePlan]) -> None:
    fs, _ = storage.filesystem(out)
    paths = [path for plan in plans for _, path, _ in plan.remove]
    if paths:
        fs.rm(paths)
