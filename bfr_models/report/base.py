"""What every part of the report shares: the sets, sections, metric columns, formatting and HTML helpers."""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

METRIC_DIRECTIONS = {"niqe": "lower", "musiq": "higher", "lpips": "lower", "psnr": "higher", "ssim": "higher",
                     "fid": "lower",
                     # the pseudo-target checks: low-frequency consistency with the input, noise leakage
                     "lf_psnr": "higher", "noise_sigma": "lower",
                     "nrqm": "higher", "pi": "lower",
                     # the clean stage's content check (x1/8 copies of x* against x; its LPIPS is "lpips")
                     "lowpass_psnr": "higher"}
_METRIC_RE = re.compile(r"^(%s)(_[A-Za-z0-9_]+)?$" % "|".join(METRIC_DIRECTIONS))
# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#8C6D1F", "#000000")
_MAX_SPLIT_SERIES = len(PALETTE)
_MAX_ERROR_ROWS = 50


@dataclass
class ScoredSet:
    """One scored manifest: its rows (with metric columns), the score stage's index config, and the rows of the
    manifests its rows descend from (``image_id, uri, stage, parent_id``: the lineage strips walk it)."""

    name: str
    frame: pd.DataFrame
    info: dict = field(default_factory=dict)
    lineage: pd.DataFrame | None = None


@dataclass
class Section:
    """A report section: a heading (plain text, escaped on output) and a body of trusted HTML."""

    heading: str
    html: str
    id: str = ""


# --------------------------------------------------------------------------------------------
# metric columns and formatting


def metric_base(column: str) -> str | None:
    """The known metric a column is named after (``psnr_y`` -> ``psnr``), or None."""
    m = _METRIC_RE.match(column)
    return m.group(1) if m else None


def metric_direction(column: str) -> str | None:
    """"lower" or "higher" (is better) for a metric column, None for any other column."""
    base = metric_base(column)
    return METRIC_DIRECTIONS[base] if base else None


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """The metric columns of a frame, in METRIC_DIRECTIONS order, then by name."""
    found = []
    for col in frame.columns:
        if not isinstance(col, str) or metric_base(col) is None:
            continue
        dtype = frame[col].dtype
        if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            continue
        found.append(col)
    order = list(METRIC_DIRECTIONS)
    return sorted(found, key=lambda c: (order.index(metric_base(c)), c))


def _all_metrics(sets: list[ScoredSet]) -> list[str]:
    order = list(METRIC_DIRECTIONS)
    names = {c for s in sets for c in metric_columns(s.frame)}
    return sorted(names, key=lambda c: (order.index(metric_base(c)), c))


def _missing(v) -> bool:
    if v is None or v is pd.NA:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def fmt(v) -> str:
    """A value as short text: 4 significant digits for floats, '—' for missing."""
    if _missing(v):
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4g}"
    return str(v)


def esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "x"


def _text(v) -> str | None:
    """A cell as a string, or None when missing."""
    return None if _missing(v) else str(v)


# --------------------------------------------------------------------------------------------
# the frames: defensive column access


def _col(frame: pd.DataFrame, name: str) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([None] * len(frame), index=frame.index, dtype=object)


def _status(frame: pd.DataFrame) -> pd.Series:
    if "status" not in frame.columns:
        return pd.Series(["ok"] * len(frame), index=frame.index, dtype=object)
    return frame["status"].astype(object).where(frame["status"].notna(), None)


def _preset(stage, split, params) -> str | None:
    """The degradation preset of a row: ``params['preset']`` if recorded, else (degrade rows,
    whose split label is ``<preset>`` or ``<preset>/<split>``) the label's first part."""
    if isinstance(params, str) and '"preset"' in params:
        try:
            value = json.loads(params).get("preset")
        except (ValueError, AttributeError):
            value = None
        if isinstance(value, str):
            return value
    if stage == "degrade" and isinstance(split, str) and split:
        return split.split("/", 1)[0]
    return None


# --------------------------------------------------------------------------------------------
# summary


def prepared(sets) -> list[ScoredSet]:
    """The sets as every table shows them: renamed "name (2)", "name (3)" where names repeat, and a clean
    stage's scores as the cleaned set has them (:func:`kept_scores`). Idempotent."""
    out, seen = [], {}
    for s in sets:
        seen[s.name] = seen.get(s.name, 0) + 1
        name = s.name if seen[s.name] == 1 else f"{s.name} ({seen[s.name]})"
        frame = kept_scores(s.frame)
        out.append(s if name == s.name and frame is s.frame else ScoredSet(name, frame, s.info, s.lineage))
    return out


def kept_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """A clean stage's rows with ``<metric>_after`` blanked where the candidate was rejected: the row keeps the
    original image, so only accepted candidates' scores describe the cleaned set. Other frames as they are."""
    after = [c for c in metric_columns(frame) if c.endswith("_after")]
    if "replaced" not in frame.columns or not after or not (_col(frame, "stage") == "clean").any():
        return frame
    rejected = (_col(frame, "stage") == "clean") & ~frame["replaced"].eq(True)
    out = frame.copy()
    out.loc[rejected, after] = np.nan
    return out


# --------------------------------------------------------------------------------------------
# HTML helpers


def html_table(columns: list[str], rows: list[list], numeric: set[int] | None = None, cls: str = "") -> str:
    """A table of plain values (escaped). ``numeric`` holds the indices of right-aligned columns;
    a cell given as ``Markup`` is inserted as is."""
    numeric = numeric or set()
    head = "".join(f'<th{" class=num" if i in numeric else ""}>{esc(c)}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = v if isinstance(v, Markup) else esc(fmt(v))
            cells.append(f'<td{" class=num" if i in numeric else ""}>{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls_attr = f' class="{esc(cls)}"' if cls else ""
    return f'<table{cls_attr}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


class Markup(str):
    """HTML that ``html_table`` inserts without escaping."""


def _code(text) -> Markup:
    return Markup(f"<code>{esc(text)}</code>") if not _missing(text) and text != "" else Markup("—")


def _swatch(color: str) -> str:
    return f'<span class="sw" style="background:{color}"></span>'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


