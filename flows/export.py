"""Training-ready exports of a manifest, named by source file, and the list of stage runs under an output root.

Every exported image is a PNG named after its row's ``source_name`` (``name__2``, ``name__3`` ... when several
rows share one). Pairs follow the stage that made the row (see :data:`PAIR_DIRECTION`). Rows are read as
metadata; images are read and written one row at a time.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re

import pandas as pd
from PIL import Image

from bfr_models import manifest, storage
from bfr_models.imageio import decode_source, encode_png
from flows.export_formats import FORMATS, META_INFO, NAMES_FILE, PAIR_DIRECTION

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHARD_PATTERN = "shard-%06d.tar"
GATE_COLUMN = "gate"
_UNSAFE = re.compile(r"[\s/\\.]+")  # path separators, dots (webdataset splits keys at them), whitespace (meta_info)


class ExportError(ValueError):
    """A manifest or option that cannot be exported as asked (one line)."""


def safe_name(name: str) -> str:
    """A source name usable as a flat file name and webdataset key."""
    return _UNSAFE.sub("_", name).strip("_")


def export_names(rows: list[dict]) -> list[str]:
    """One unique name per row from its source_name (its image_id when it has none); the first row of a name
    (rows ordered by name, then image_id, so the names do not depend on shard order) keeps it, the others get
    ``__2``, ``__3``..."""
    used: set[str] = set()
    names = {}
    for row in sorted(rows, key=lambda r: (_base(r), r["image_id"])):
        base = _base(row)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}__{k}"
        used.add(name)
        names[row["image_id"]] = name
    return [names[r["image_id"]] for r in rows]


def _base(row: dict) -> str:
    return safe_name(row.get("source_name") or "") or row["image_id"]


def selected_rows(uri: str, include_failed: bool) -> tuple[list[dict], dict[str, int]]:
    """The ok rows to export (gate-passing ones only where the manifest has a gate column, unless
    ``include_failed``), and how many rows were left out, by why."""
    df = manifest.read_manifest(uri)
    left_out = {"error": int((df["status"] != "ok").sum())}
    df = df[df["status"] == "ok"]
    if GATE_COLUMN in df.columns and not include_failed:
        passing = df[GATE_COLUMN] == "pass"
        left_out["gate"] = int((~passing).sum())
        df = df[passing]
    rows = [{k: _plain(v) for k, v in r.items()} for r in df.to_dict("records")]
    return sorted(rows, key=lambda r: (_base(r), r["image_id"])), left_out


def _plain(v):
    """A JSON-ready value: NaN and pandas' missing values become None, numpy scalars Python ones."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def pair_uris(row: dict) -> tuple[str, str] | None:
    """(LQ URI, GT URI) of a row, or None for a stage without a pair (ingest, clean, restore, input)."""
    direction = PAIR_DIRECTION.get(row.get("stage"))
    if direction is None or not row.get("parent_uri"):
        return None
    return (row["uri"], row["parent_uri"]) if direction == "row_is_lq" else (row["parent_uri"], row["uri"])


def as_png(uri: str) -> bytes:
    """The image at ``uri`` as PNG: an 8-bit RGB PNG byte for byte, anything else as the stages decode it."""
    data = storage.read_bytes(uri)
    if data.startswith(PNG_MAGIC) and Image.open(io.BytesIO(data)).mode == "RGB":
        return data
    return encode_png(decode_source(data, uri)[0])


def shape_text(png: bytes) -> str:
    """(h,w,c) of a PNG from its header, as BasicSR's meta_info lines write it."""
    im = Image.open(io.BytesIO(png))
    return f"({im.height},{im.width},{len(im.getbands())})"


def sample_record(row: dict) -> dict:
    """What a webdataset sample's .json holds: the row's ids, params (parsed) and numeric metrics."""
    core = set(manifest.CORE_COLUMNS)
    metrics = {k: v for k, v in row.items()
               if k not in core and isinstance(v, (int, float)) and not isinstance(v, bool)}
    record = {k: row.get(k) for k in ("image_id", "parent_id", "source_name", "stage", "split", "seed")}
    record["params"] = json.loads(row["params"]) if row.get("params") else None
    record["metrics"] = metrics
    for k in (GATE_COLUMN, "gate_reason"):
        if k in row:
            record[k] = row[k]
    return record


def _check_out(out: str) -> None:
    """An export never mixes with an older one: ``out`` must be new or an empty folder."""
    fs, path = storage.filesystem(out)
    if fs.exists(path) and (not fs.isdir(path) or fs.ls(path)):
        raise ExportError(f"--out {out} exists and is not empty: export into a new folder")


def export_manifest(input: str, fmt: str, out: str, include_failed: bool = False,
                    samples_per_shard: int = 1000) -> dict:
    """Write the rows of ``input`` to ``out`` in ``fmt``; returns counts (written, left out by reason)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if samples_per_shard < 1:
        raise ExportError(f"--samples-per-shard must be at least 1, not {samples_per_shard}")
    out = storage.normalize(out).rstrip("/")
    _check_out(out)
    rows, left_out = selected_rows(input, include_failed)
    if fmt in ("paired", "basicsr"):
        unpaired = sorted({r.get("stage") or "-" for r in rows if pair_uris(r) is None})
        if unpaired:
            raise ExportError(f"--format {fmt} needs rows with an LQ/GT pair (stages "
                              f"{', '.join(PAIR_DIRECTION)}); this manifest has {', '.join(unpaired)} rows: "
                              f"use --format folder")
    names = export_names(rows)
    if fmt == "webdataset":
        _write_webdataset(rows, names, out, samples_per_shard)
    else:
        _write_files(rows, names, out, fmt)
    return {"written": len(rows), "left_out": left_out, "out": out}


def _write_files(rows: list[dict], names: list[str], out: str, fmt: str) -> None:
    meta_lines, table = [], io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["name", "image_id", "parent_id", "source_name", "stage", "split"])
    for row, name in zip(rows, names):
        file = f"{name}.png"
        if fmt == "folder":
            storage.write_bytes_atomic(storage.join(out, file), as_png(row["uri"]))
        else:
            lq_uri, gt_uri = pair_uris(row)
            gt = as_png(gt_uri)
            storage.write_bytes_atomic(storage.join(out, "lq", file), as_png(lq_uri))
            storage.write_bytes_atomic(storage.join(out, "gt", file), gt)
            meta_lines.append(f"{file} {shape_text(gt)}\n")
        writer.writerow([name, row["image_id"], row.get("parent_id"), row.get("source_name"), row.get("stage"),
                         row.get("split")])
    if fmt == "basicsr":
        storage.write_bytes_atomic(storage.join(out, META_INFO), "".join(meta_lines).encode())
    storage.write_bytes_atomic(storage.join(out, NAMES_FILE), table.getvalue().encode())


def _write_webdataset(rows: list[dict], names: list[str], out: str, samples_per_shard: int) -> None:
    """Tar shards of samples keyed by name: .lq.png and .gt.png for a pair (.png otherwise) and .json."""
    import webdataset as wds

    fs, root = storage.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    opened = {}

    def opener(path: str):  # fsspec files, so shards go to S3 as well; closed by `post` once the tar is done
        opened[path] = fs.open(path, "wb")
        return opened[path]

    with wds.ShardWriter(f"{root}/{SHARD_PATTERN}", maxcount=samples_per_shard, verbose=0, opener=opener,
                         post=lambda path: opened.pop(path).close(), encoder=False, mtime=0) as sink:
        for row, name in zip(rows, names):
            pair = pair_uris(row)
            images = {"lq.png": as_png(pair[0]), "gt.png": as_png(pair[1])} if pair else {"png": as_png(row["uri"])}
            sink.write({"__key__": name, **images, "json": json.dumps(sample_record(row), sort_keys=True).encode()})


def list_runs(out: str) -> list[dict]:
    """Every complete stage run under an output root (``<out>/<stage>/<key>/index.json``), oldest first."""
    fs, root = storage.filesystem(storage.normalize(out))
    if not fs.isdir(root):
        raise FileNotFoundError(f"output root not found: {out}")
    runs = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/*/*/{manifest.INDEX_NAME}")):
        stage, key = path.rsplit("/", 3)[-3:-1]
        uri = storage.join(storage.normalize(out), stage, key)
        try:
            index = manifest.read_index(uri)
            status = manifest.read_manifest(uri)["status"] if index["rows"] else pd.Series([], dtype=str)
        except (manifest.ManifestError, OSError) as e:
            runs.append({"stage": stage, "key": key, "created": "", "problem": str(e), "uri": uri})
            continue
        config = index.get("config", {})
        runs.append({"stage": index["stage"], "key": index["key"], "created": index.get("created", ""),
                     "input": _relative(index.get("input") or config.get("source") or "-", storage.normalize(out)),
                     "config": config_summary(config), "ok": int((status == "ok").sum()),
                     "error": int((status != "ok").sum()), "uri": uri})
    return sorted(runs, key=lambda r: (r.get("created", ""), r["stage"]))


def _relative(uri: str, root: str) -> str:
    """An input under the output root as ``<stage>/<key>`` (the run that made it), others as they are."""
    return uri[len(root.rstrip("/")) + 1:] if uri.startswith(root.rstrip("/") + "/") else uri


SUMMARY_SKIP = {"source", "skipped_inputs", "exclude", "conventions", "not_computed", "set_metrics", "rounds",
                "auto", "code", "prior", "sample_ids"}  # recorded results and hashes, not settings


# settings that say most about a run, shown first (nested ones without their parent's name: preset.name -> name)
SUMMARY_FIRST = ("name", "split", "scale", "method", "N", "tau", "K", "metrics", "model", "round", "seed")


def config_summary(config: dict, width: int = 60) -> str:
    """The settings of a stage in one short line: scalar values, one level of nesting, the telling ones first."""
    pairs = []
    for key, value in config.items():
        if key in SUMMARY_SKIP or value is None or value == []:
            continue
        if isinstance(value, dict):
            pairs += [(k, v) for k, v in value.items() if v is not None and not isinstance(v, (dict, list))]
        else:
            pairs.append((key, ",".join(map(str, value)) if isinstance(value, list) else value))
    order = {k: i for i, k in enumerate(SUMMARY_FIRST)}
    pairs.sort(key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
    text = " ".join(f"{k}={v}" for k, v in pairs)
    return text if len(text) <= width else text[: width - 1] + "…"
