"""What the console shows of results: a score summary, a manifest's first rows, the --auto grid; per-image CSV."""

from __future__ import annotations

import io

import pandas as pd

from bfr_models import manifest, storage
from bfr_models.report import metric_columns
from flows.text_table import text_table

SCORE_CSV_COLUMNS = ["image_id", "source_name", "stage", "split", "status", "error", "uri"]


def score_summary(uri: str) -> str:
    """Per stage/split and metric: images scored, mean and median (and the set-level metrics, e.g. FID)."""
    index = manifest.read_index(uri)
    df = manifest.read_manifest(uri)
    ok = df[df["status"] == "ok"] if len(df) else df
    metrics = metric_columns(df)
    groups = [((stage, split), g) for (stage, split), g in
              ok.fillna({"split": "-", "stage": "-"}).groupby(["stage", "split"], sort=True)] if len(ok) else []
    if len(groups) > 1:
        groups.append((("all", "all"), ok))
    rows = []
    for (stage, split), g in groups:
        for m in metrics:
            values = pd.to_numeric(g[m], errors="coerce").dropna()
            rows.append([stage, split, m, len(values), values.mean() if len(values) else None,
                         values.median() if len(values) else None])
    lines = [text_table(["stage", "split", "metric", "n", "mean", "median"], rows) if rows else "no metric values"]
    for name, record in sorted((index["config"].get("set_metrics") or {}).items()):
        value = record.get("value") if isinstance(record, dict) else record
        lines.append(f"{name}: {value}")
    for r in index["config"].get("not_computed") or []:
        lines.append(f"not computed: {r.get('metric')} (needs {r.get('needs')})")
    return "\n".join(lines)


def write_scores_csv(uri: str, out: str) -> int:
    """One line per row of a scored manifest: ids, source name, split, status and every metric; returns rows."""
    df = manifest.read_manifest(uri)
    columns = [c for c in SCORE_CSV_COLUMNS if c in df.columns] + metric_columns(df)
    buf = io.StringIO()
    df[columns].to_csv(buf, index=False)
    storage.write_bytes_atomic(storage.normalize(out), buf.getvalue().encode())
    return len(df)


def head_table(df: pd.DataFrame, n: int) -> str:
    """The first ``n`` rows' values: ids, source name, split, status, metrics (and the error of error rows)."""
    head = df.head(n)
    columns = [c for c in ("image_id", "source_name", "split", "status") if c in head.columns] + metric_columns(head)
    if "error" in head.columns and head["error"].notna().any():
        columns.append("error")
    rows = [[None if pd.isna(v) else v for v in r] for r in head[columns].itertuples(index=False)]
    return text_table(columns, rows, max_width=48)


def auto_grid(search: dict) -> str:
    """The --auto search as recorded in the index: the settings that vary and every score of each candidate
    (floats, and the gate's verdict where recorded), the chosen one marked."""
    grid = search.get("grid") or []
    if not grid:
        return "auto: no candidates recorded"
    scores = [k for k in grid[0] if k in (search.get("metric"), "gate", "gate_reason")
              or any(isinstance(g.get(k), float) for g in grid)]  # a NaN score is read back from JSON as None
    scores.sort(key=lambda k: k != search.get("metric"))  # the chosen metric first
    varying = [k for k in grid[0] if k not in scores and len({str(g.get(k)) for g in grid}) > 1]
    chosen = search.get("chosen")
    rows = [["*" if i == chosen else ""] + [g.get(k) for k in varying + scores] for i, g in enumerate(grid)]
    choice = ", ".join(f"{k}={grid[chosen].get(k)}" for k in varying) if chosen is not None else "-"
    return "\n".join([f"auto: {len(grid)} candidates scored with {search.get('metric')}",
                      text_table(["chosen", *varying, *scores], rows),
                      f"auto chose: {choice} ({search.get('reason')})"])


def _span(value) -> str | None:
    """A parameter range as text: [0.1, 10] -> '0.1-10', [800, 800] and 4 -> '800', '4'."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return "-".join(dict.fromkeys(_span(v) for v in value))
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def preset_rows(name: str, info: dict) -> list[list]:
    """A preset's rows for `presets`: one per split, with its key ranges (blur sigma, downscale, noise sigma,
    JPEG quality; ISO for camera-RAW noise; the number of cases of a protocol)."""
    splits = info.get("splits") or {info.get("split"): info.get("parameters") or {}}
    rows = []
    for i, (split, params) in enumerate(splits.items()):
        scale = _span((params.get("downsample") or {}).get("scale")) or "/".join(map(str, info.get("scales") or []))
        other = f"{len(params['cases'])} cases" if params.get("cases") else (
            f"iso {_span(params['iso'])}" if "iso" in params else None)
        rows.append([name if i == 0 else "", split, scale or None, _span((params.get("blur") or {}).get("sigma")),
                     _span((params.get("noise") or {}).get("sigma")), _span((params.get("jpeg") or {}).get("quality")),
                     other, info["description"] if i == 0 else ""])
    return rows


def presets_table(described: dict[str, dict]) -> str:
    """Every degradation preset with its splits and key parameter ranges (``presets --json`` has them all)."""
    rows = [r for name, info in described.items() for r in preset_rows(name, info)]
    return text_table(["preset", "split", "scale", "blur sigma", "noise sigma", "jpeg q", "other", "description"],
                      rows, max_width=70)
