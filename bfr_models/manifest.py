"""The manifest: Parquet shards of one row per image, plus an index that makes a stage complete.

Layout of a stage run (``<root>/<stage>/<key>/``)::

    index.json            stage, key, config, every shard with its sha256 and row count
    shards/<shard>.parquet
    images/<image_id>.png

A shard is written whole or not at all; a stage is complete when ``index.json`` exists.

Nothing read back is trusted blindly: shard paths must stay inside the stage folder, and a shard must
have the size, sha256 and row count the index records (see :func:`read_index` and :func:`read_table`).
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from bfr_models import storage

if TYPE_CHECKING:  # pandas costs ~0.3 s to import: only the callers of read_manifest pay it
    import pandas as pd

SCHEMA_VERSION = 1
_VERSION_KEY = b"bfr_curate.schema_version"
INDEX_NAME = "index.json"
IMAGES_FOLDER = "images"

# The core columns every manifest has, defined once. Scoring adds metric columns beside them.
CORE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # content-derived, stable
        pa.field("uri", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("parent_id", pa.string()),
        pa.field("parent_uri", pa.string()),
        pa.field("duplicate_of", pa.string()),  # a byte-identical copy of an earlier input file: that file's id
        pa.field("source_name", pa.string()),  # the original file's stem (relative to its folder), down the lineage
        pa.field("stage", pa.string(), nullable=False),
        pa.field("split", pa.string()),  # preset/split label used to group reports
        pa.field("seed", pa.int64()),
        pa.field("params", pa.string()),  # JSON: every sampled parameter that produced the image
        pa.field("status", pa.string(), nullable=False),  # "ok" or "error"
        pa.field("error", pa.string()),
    ]
)
CORE_COLUMNS = CORE_SCHEMA.names


class ManifestError(ValueError):
    """A manifest that cannot be read: missing, incomplete, corrupt, or of an unknown version."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: str  # relative to the stage folder
    sha256: str
    rows: int
    bytes: int | None = None  # file size; absent in indexes written before it was recorded


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts) to a table with the core schema first; extra columns are inferred."""
    columns = {}
    fields = []
    for field in CORE_SCHEMA:
        columns[field.name] = pa.array([r.get(field.name) for r in rows], type=field.type)
        fields.append(field)
    extra = sorted({k for r in rows for k in r} - set(CORE_COLUMNS))
    for name in extra:
        arr = pa.array([r.get(name) for r in rows])
        columns[name] = arr
        fields.append(pa.field(name, arr.type))
    schema = pa.schema(fields, metadata={_VERSION_KEY: str(SCHEMA_VERSION).encode()})
    return pa.Table.from_pydict(columns, schema=schema)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


class ManifestWriter:
    """Writes images, shards and the index of one stage run under ``stage_uri``."""

    def __init__(self, stage_uri: str):
        self.stage_uri = stage_uri.rstrip("/")

    def image_uri(self, image_id: str, ext: str = "png") -> str:
        return storage.join(self.stage_uri, IMAGES_FOLDER, f"{image_id}.{ext}")

    def write_image(self, image_id: str, data: bytes, ext: str = "png") -> str:
        uri = self.image_uri(image_id, ext)
        storage.write_bytes_atomic(uri, data)
        return uri

    def write_shard(self, name: str, rows: list[dict]) -> ShardInfo:
        data = table_to_parquet_bytes(rows_to_table(rows))
        rel = f"shards/{name}.parquet"
        storage.write_bytes_atomic(storage.join(self.stage_uri, rel), data)
        return ShardInfo(name=name, path=rel, sha256=storage.sha256_hex(data), rows=len(rows), bytes=len(data))

    def write_index(self, stage: str, key: str, config: dict, shards: list[ShardInfo], input: str | None = None) -> str:
        index = {
            "schema_version": SCHEMA_VERSION,
            "stage": stage,
            "key": key,
            "input": input,  # what the stage read (a folder or a manifest), for `bfr-curate runs`
            "config": config,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "rows": sum(s.rows for s in shards),
            "shards": [asdict(s) for s in sorted(shards, key=lambda s: s.name)],
        }
        uri = storage.join(self.stage_uri, INDEX_NAME)
        storage.write_bytes_atomic(uri, json.dumps(index, indent=1, sort_keys=True).encode())
        return uri


def _check_version(version, where: str) -> None:
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{where} has manifest schema version {version!r}; this bfr-curate reads version {SCHEMA_VERSION}"
        )


def index_uri(uri: str) -> str | None:
    """The index.json of a manifest URI (a stage folder or the index itself), if there is one."""
    uri = uri.rstrip("/")
    candidate = uri if uri.endswith(INDEX_NAME) else storage.join(uri, INDEX_NAME)
    return candidate if storage.exists(candidate) else None


def is_manifest(uri: str) -> bool:
    return index_uri(uri) is not None or uri.endswith(".parquet")


def shard_uri(stage_uri: str, shard: dict) -> str:
    """Where a shard of an index lives; a path that leaves the stage folder is refused."""
    try:
        return storage.confined_join(stage_uri, shard.get("path"))
    except ValueError as e:
        raise ManifestError(f"{stage_uri}: shard {shard.get('name')!r}: {e}") from None


def shard_problem(shard: dict, data: bytes) -> str | None:
    """What differs between a shard's bytes and what its index (or cached task result) records, if anything."""
    if shard.get("bytes") is not None and len(data) != shard["bytes"]:
        return f"has {len(data)} bytes, the index records {shard['bytes']}"
    digest = storage.sha256_hex(data)
    if digest != shard.get("sha256"):
        return f"has sha256 {digest[:12]}…, the index records {str(shard.get('sha256'))[:12]}…"
    try:
        rows = pq.read_metadata(io.BytesIO(data)).num_rows
    except Exception as e:  # noqa: BLE001 — any unreadable footer is a corrupt shard
        return f"is not a readable Parquet file ({type(e).__name__})"
    if rows != shard.get("rows"):
        return f"has {rows} rows, the index records {shard.get('rows')}"
    return None


def image_names(stage_uri: str) -> frozenset[str]:
    """The file names in a stage's images/ folder (one listing)."""
    return frozenset(storage.file_sizes(storage.join(stage_uri, IMAGES_FOLDER)))


def shard_files_problem(stage_uri: str, shard: dict, images: Collection[str]) -> str | None:
    """Why a shard recorded in an index or a cached task result cannot be reused, if it cannot: a path outside
    the stage folder, a missing file, other bytes than recorded, or rows naming images of this stage that are
    not among ``images`` (from :func:`image_names`). Reads the shard, never the images."""
    try:
        data = storage.read_bytes(shard_uri(stage_uri, shard))
    except ManifestError as e:
        return str(e)
    except FileNotFoundError:
        return f"its file {shard.get('path')} is missing"
    problem = shard_problem(shard, data)
    if problem:
        return f"its file {problem}"
    prefix = storage.join(stage_uri, IMAGES_FOLDER) + "/"
    uris = pq.read_table(io.BytesIO(data), columns=["uri"]).column("uri").to_pylist()
    missing = [u for u in uris if u and u.startswith(prefix) and u[len(prefix):] not in images]
    if missing:
        return f"{len(missing)} of its images are missing, e.g. {missing[0]}"
    return None


def _check_sizes(stage_uri: str, shards: list[dict]) -> None:
    """The cheap check on every read: each shard is there with its recorded size (one listing per folder)."""
    listings: dict[str, dict[str, int]] = {}
    for shard in shards:
        folder, name = shard_uri(stage_uri, shard).rsplit("/", 1)
        sizes = listings.setdefault(folder, storage.file_sizes(folder))
        if name not in sizes:
            raise ManifestError(f"{stage_uri}: shard {shard.get('name')!r} is missing ({shard['path']}); "
                                f"rerun the stage to recompute it")
        if shard.get("bytes") is not None and sizes[name] != shard["bytes"]:
            raise ManifestError(f"{stage_uri}: shard {shard.get('name')!r} has {sizes[name]} bytes, the index records "
                                f"{shard['bytes']}; rerun the stage to recompute it")


def read_index(uri: str, verify: bool = False, check_shards: bool = True) -> dict:
    """The index of a stage, checked: valid JSON, known version, shard paths inside the stage folder, every
    shard present with its recorded size (one listing). ``verify``: also read every shard and check its
    sha256 and row count. ``check_shards=False``: only the index itself (for callers checking each shard)."""
    found = index_uri(uri)
    if found is None:
        raise ManifestError(f"no complete manifest at {uri} (no {INDEX_NAME}; the stage may not have finished)")
    try:
        index = json.loads(storage.read_bytes(found))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{found} is corrupt (not valid JSON: {e}); rerun the stage to rewrite it") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list) or not all(
            isinstance(s, dict) for s in index["shards"]):
        raise ManifestError(f"{found} is corrupt (no list of shards); rerun the stage to rewrite it")
    _check_version(index.get("schema_version"), found)
    stage_uri = found.rsplit("/", 1)[0]
    if check_shards:
        _check_sizes(stage_uri, index["shards"])
    if verify:
        for shard in index["shards"]:
            _read_shard(stage_uri, shard)
    return index


def _read_shard(stage_uri: str, shard: dict) -> bytes:
    data = storage.read_bytes(shard_uri(stage_uri, shard))
    problem = shard_problem(shard, data)
    if problem:
        raise ManifestError(f"{stage_uri}: shard {shard.get('name')!r} {problem}; rerun the stage to recompute it")
    return data


def _verify_images(table: pa.Table, where: str) -> None:
    """Every ok row's image is there and hashes to the row's sha256 (reads every image: ``verify`` only)."""
    columns = table.select(["uri", "sha256", "status"]).to_pylist()
    for row in (r for r in columns if r["status"] == "ok" and r["uri"]):
        try:
            digest = storage.sha256_hex(storage.read_bytes(row["uri"]))
        except FileNotFoundError:
            raise ManifestError(f"{where}: image {row['uri']} is missing") from None
        if digest != row["sha256"]:
            raise ManifestError(f"{where}: image {row['uri']} has sha256 {digest[:12]}…, "
                                f"the manifest records {str(row['sha256'])[:12]}…")


def read_table(uri: str, verify: bool = False) -> pa.Table:
    """Read a whole manifest: a stage folder (via its index) or a single Parquet file.

    Every shard read is checked against the index (size, sha256, row count: the bytes are in memory, so the
    hash costs little next to the read). ``verify``: also read every ok row's image and check its sha256.
    """
    if uri.endswith(".parquet"):
        blobs = [(uri, storage.read_bytes(uri))]
    else:
        index = read_index(uri)
        stage_uri = index_uri(uri).rsplit("/", 1)[0]
        blobs = [(shard_uri(stage_uri, s), _read_shard(stage_uri, s)) for s in index["shards"]]
    tables = []
    for path, data in blobs:
        table = pq.read_table(io.BytesIO(data))
        meta = table.schema.metadata or {}
        raw = meta.get(_VERSION_KEY)
        _check_version(int(raw) if raw is not None else None, path)
        tables.append(table)
    if not tables:
        return rows_to_table([])
    table = pa.concat_tables(tables, promote_options="default")
    if verify:
        _verify_images(table, uri)
    return table


def read_manifest(uri: str, verify: bool = False) -> pd.DataFrame:
    return read_table(uri, verify=verify).to_pandas()
