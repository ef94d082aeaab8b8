"""The manifest: Parquet shards of one row per image, plus an index that makes a stage complete.

Layout of a stage run (``<root>/<stage>/<key>/``)::

    index.json            stage, key, config, every shard with its sha256 and row count
    shards/<shard>.parquet
    images/<image_id>.png

A shard is written whole or not at all; a stage is complete when ``index.json`` exists.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
from dataclasses import asdict, dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from bfr_models import storage

SCHEMA_VERSION = 1
_VERSION_KEY = b"bfr_curate.schema_version"
INDEX_NAME = "index.json"

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
    """A manifest that cannot be read: missing, incomplete, or of an unknown version."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: str  # relative to the stage folder
    sha256: str
    rows: int


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
        return storage.join(self.stage_uri, "images", f"{image_id}.{ext}")

    def write_image(self, image_id: str, data: bytes, ext: str = "png") -> str:
        uri = self.image_uri(image_id, ext)
        storage.write_bytes_atomic(uri, data)
        return uri

    def write_shard(self, name: str, rows: list[dict]) -> ShardInfo:
        data = table_to_parquet_bytes(rows_to_table(rows))
        rel = f"shards/{name}.parquet"
        storage.write_bytes_atomic(storage.join(self.stage_uri, rel), data)
        return ShardInfo(name=name, path=rel, sha256=storage.sha256_hex(data), rows=len(rows))

    def write_index(self, stage: str, key: str, config: dict, shards: list[ShardInfo]) -> str:
        index = {
            "schema_version": SCHEMA_VERSION,
            "stage": stage,
            "key": key,
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


def read_index(uri: str) -> dict:
    found = index_uri(uri)
    if found is None:
        raise ManifestError(f"no complete manifest at {uri} (no {INDEX_NAME}; the stage may not have finished)")
    index = json.loads(storage.read_bytes(found))
    _check_version(index.get("schema_version"), found)
    return index


def read_table(uri: str) -> pa.Table:
    """Read a whole manifest: a stage folder (via its index) or a single Parquet file."""
    if uri.endswith(".parquet"):
        paths = [uri]
    else:
        index = read_index(uri)
        stage_uri = index_uri(uri).rsplit("/", 1)[0]
        paths = [storage.join(stage_uri, s["path"]) for s in index["shards"]]
    tables = []
    for path in paths:
        table = pq.read_table(io.BytesIO(storage.read_bytes(path)))
        meta = table.schema.metadata or {}
        raw = meta.get(_VERSION_KEY)
        _check_version(int(raw) if raw is not None else None, path)
        tables.append(table)
    if not tables:
        return rows_to_table([])
    return pa.concat_tables(tables, promote_options="default")


def read_manifest(uri: str) -> pd.DataFrame:
    return read_table(uri).to_pandas()
