"""The quality report: summary tables, histograms, best/worst and before/after thumbnails, as HTML.

One self-contained HTML file (inline CSS, inline SVG, images embedded as base64 JPEG thumbnails),
built from sections so later stages can add their own::

    html = render_report(sets, extra_sections=[("Pseudo targets", body_html)])

Every section builder (``summary_section``, ``histogram_section``, ...) returns a ``Section``;
``render_page`` assembles any list of them. No Prefect here: the report flow publishes
``summary_table`` and ``summary_markdown`` as Prefect artifacts.

Conventions of the report itself (also printed in the report):
- a metric column is a numeric column named after a known metric, optionally with a suffix
  (``psnr``, ``psnr_y``); whether lower or higher is better comes from ``METRIC_DIRECTIONS``;
- means and medians skip missing values (pandas' defaults); an infinite value (the PSNR of two
  identical images) is kept, so a mean can be ``inf``;
- histograms pool the finite values of all plotted series to choose the bins; infinite values are
  counted beside the plot;
- best/worst ties are broken by ``image_id``, so the same manifest always gives the same report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from PIL import Image

from bfr_models import storage
from bfr_models.imageio import decode_rgb

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
    """One scored manifest: its rows (with metric columns) and the score stage's index config."""

    name: str
    frame: pd.DataFrame
    info: dict = field(default_factory=dict)


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


def _distinct(sets) -> list[ScoredSet]:
    """The sets, renamed "name (2)", "name (3)" where names repeat, so every table tells them apart."""
    out, seen = [], {}
    for s in sets:
        seen[s.name] = seen.get(s.name, 0) + 1
        out.append(s if seen[s.name] == 1 else ScoredSet(f"{s.name} ({seen[s.name]})", s.frame, s.info))
    return out


def summary_table(sets: list[ScoredSet]) -> pd.DataFrame:
    """One row per (set, stage, split): counts, and the mean and median of each metric column.

    Columns: set, stage, preset, split, n, n_ok, n_error, then ``<metric>_mean`` and
    ``<metric>_median`` for every metric column of any set (NaN where a set lacks it). A set with
    no rows gives one row with n = 0 so it still shows."""
    sets = _distinct(sets)
    metrics = _all_metrics(sets)
    records = []
    for s in sets:
        f = s.frame
        if len(f) == 0:
            records.append({"set": s.name, "stage": None, "preset": None, "split": None, "n": 0, "n_ok": 0,
                            "n_error": 0, **{f"{m}_{k}": np.nan for m in metrics for k in ("mean", "median")}})
            continue
        keys = pd.DataFrame({"stage": _col(f, "stage").astype(object), "split": _col(f, "split").astype(object)},
                            index=f.index)
        keys = keys.where(keys.notna(), "\x00")  # a sortable stand-in for missing keys
        status = _status(f)
        groups = sorted(keys.groupby(["stage", "split"], sort=False).groups.items(), key=lambda kv: kv[0])
        for (stage, split), index in groups:
            stage = None if stage == "\x00" else stage
            split = None if split == "\x00" else split
            rows = f.loc[index]
            st = status.loc[index]
            presets = {_preset(stage, split, p) for p in _col(rows, "params")}
            rec = {"set": s.name, "stage": stage, "preset": presets.pop() if len(presets) == 1 else None,
                   "split": split, "n": int(len(rows)), "n_ok": int((st == "ok").sum()),
                   "n_error": int((st == "error").sum())}
            for m in metrics:
                col = rows[m] if m in rows.columns else pd.Series(dtype=float)
                col = pd.to_numeric(col, errors="coerce")
                rec[f"{m}_mean"] = float(col.mean()) if col.notna().any() else np.nan
                rec[f"{m}_median"] = float(col.median()) if col.notna().any() else np.nan
            records.append(rec)
    columns = ["set", "stage", "preset", "split", "n", "n_ok", "n_error"]
    columns += [f"{m}_{k}" for m in metrics for k in ("mean", "median")]
    table = pd.DataFrame.from_records(records, columns=columns)
    for c in ("n", "n_ok", "n_error"):
        table[c] = table[c].astype("int64")
    return table


def _md_cell(v) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def summary_markdown(sets: list[ScoredSet]) -> str:
    """The summary table as markdown, with set-level metrics, conventions and what was not computed."""
    sets = _distinct(sets)
    table = summary_table(sets)
    metrics = _all_metrics(sets)
    out = ["## Summary", ""]
    header = ["set", "stage", "preset", "split", "n", "ok", "error"]
    for m in metrics:
        arrow = "↓" if metric_direction(m) == "lower" else "↑"
        header += [f"{m} {arrow} mean", f"{m} median"]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(["---"] * 4 + ["---:"] * (len(header) - 4)) + "|")
    for rec in table.to_dict("records"):
        cells = [rec["set"], rec["stage"], rec["preset"], rec["split"], rec["n"], rec["n_ok"], rec["n_error"]]
        cells += [rec[f"{m}_{k}"] for m in metrics for k in ("mean", "median")]
        out.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    if not metrics:
        out += ["", "_No metric columns in these manifests._"]

    set_rows = [(s.name, (s.info or {}).get("set_metrics") or {}) for s in sets]
    if any(sm for _, sm in set_rows):
        out += ["", "## Set-level metrics", ""]
        for name, sm in set_rows:
            if sm:
                out.append(f"- **{_md_cell(name)}**: " + ", ".join(f"{_md_cell(k)} = {_md_cell(v)}"
                                                                  for k, v in sm.items()))
    nc = [(s.name, r) for s in sets for r in ((s.info or {}).get("not_computed") or [])]
    if nc:
        out += ["", "## Not computed", ""]
        for name, r in nc:
            line = f"- **{_md_cell(r.get('metric'))}** ({_md_cell(name)}): {_md_cell(r.get('reason') or 'not computed')}"
            if r.get("needs"):
                line += f"; needs `{r['needs']}`"
            if r.get("command"):
                line += f"; run `{r['command']}`"
            out.append(line)
    conv = _conventions_by_metric(sets)
    if conv:
        out += ["", "## Metric conventions", ""]
        for metric, by_set in conv.items():
            texts = list(dict.fromkeys(by_set.values()))
            if len(texts) == 1:
                out.append(f"- **{metric}**: {_md_cell(texts[0])}")
            else:
                out.append(f"- **{metric}** (differs between sets, values are not comparable):")
                out += [f"  - {_md_cell(n)}: {_md_cell(t)}" for n, t in by_set.items()]
    return "\n".join(out)


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


# --------------------------------------------------------------------------------------------
# thumbnails


class Thumbnails:
    """Base64 JPEG thumbnails, each image read and decoded once per report; an image that can't
    be read becomes a placeholder with the reason, never an exception."""

    def __init__(self, size: int = 128, quality: int = 85):
        self.size = max(16, int(size))
        self.quality = quality
        self._cache: dict[str, tuple[str, int, int] | str] = {}

    def _encode(self, uri: str) -> tuple[str, int, int] | str:
        if uri not in self._cache:
            try:
                rgb, _ = decode_rgb(storage.read_bytes(uri))
                im = Image.fromarray(rgb)
                if max(im.size) > self.size:
                    im.thumbnail((self.size, self.size), Image.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=self.quality)
                self._cache[uri] = (base64.b64encode(buf.getvalue()).decode("ascii"), rgb.shape[1], rgb.shape[0])
            except Exception as e:  # noqa: BLE001 -- any unreadable image is a placeholder
                self._cache[uri] = f"{type(e).__name__}: {e}"[:300]
        return self._cache[uri]

    def img(self, uri, alt: str = "") -> str:
        """An <img> (data: URI) fitted in a size x size box, or a placeholder <div>."""
        if _missing(uri) or not str(uri):
            return self.placeholder("no image URI")
        got = self._encode(str(uri))
        if isinstance(got, str):
            return self.placeholder(got)
        data, w, h = got
        scale = self.size / max(w, h)
        dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
        cls = ' class="up"' if scale > 1 else ""
        return (f'<img{cls} src="data:image/jpeg;base64,{data}" width="{dw}" height="{dh}" alt="{esc(alt)}" '
                f'title="{esc(uri)} ({w}x{h})">')

    def placeholder(self, reason: str) -> str:
        s = self.size
        return (f'<div class="ph" style="width:{s}px;height:{s}px" title="{esc(reason)}">'
                f'image unavailable<br><small>{esc(reason[:80])}</small></div>')


def _figure(thumbs: Thumbnails, uri, image_id, caption_html: str, attrs: str = "") -> str:
    return (f'<figure class="thumb"{attrs}>{thumbs.img(uri, alt=_text(image_id) or "")}'
            f'<figcaption style="max-width:{thumbs.size}px">{caption_html}</figcaption></figure>')


# --------------------------------------------------------------------------------------------
# SVG histogram


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], int]:
    """About ``n`` round tick values covering [lo, hi], and the decimals to print them with."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    span = hi - lo
    mag = 10 ** math.floor(math.log10(span / n))
    step = mult = None
    for mult in (1, 2, 2.5, 5, 10):
        step = mult * mag
        if span / step <= n:
            break
    k0 = math.ceil(lo / step - 1e-9)
    k1 = math.floor(hi / step + 1e-9)
    ticks = [k * step for k in range(k0, k1 + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-12) + (1 if mult == 2.5 else 0))
    return ticks, decimals


def _tick_label(v: float, decimals: int) -> str:
    if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-4):
        return f"{v:.3g}"
    text = f"{v:.{decimals}f}"
    return "0" if text in ("-0", "-0.0") or float(text) == 0 else text


def histogram_edges(values: np.ndarray, min_bins: int = 5, max_bins: int = 40) -> np.ndarray:
    """Bin edges over the pooled finite values: numpy's 'auto' rule, clamped to [min_bins, max_bins]."""
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo)):
        pad = max(abs(lo) * 0.05, 1e-3)
        return np.linspace(lo - pad, hi + pad, min_bins + 1)
    n = len(np.histogram_bin_edges(values, bins="auto")) - 1
    n = int(min(max(n, min_bins), max_bins))
    return np.linspace(lo, hi, n + 1)


def svg_histogram(series: list[tuple[str, np.ndarray, str]], xlabel: str, width: int = 540,
                  height: int = 230, density: bool | None = None) -> str:
    """An inline SVG histogram of several series (label, values, colour) overlaid on shared bins.

    Bars are translucent fills with a step outline per series, dashed lines mark each mean. With
    several series of different sizes the y axis is the percentage of each series, else counts."""
    series = [(label, np.asarray(v, dtype=float), c) for label, v, c in series]
    pooled = np.concatenate([v[np.isfinite(v)] for _, v, _ in series]) if series else np.array([])
    if pooled.size == 0:
        return ""
    edges = histogram_edges(pooled)
    if density is None:
        density = len(series) > 1 and len({int(np.isfinite(v).sum()) for _, v, _ in series}) > 1
    hists = []
    for label, v, c in series:
        finite = v[np.isfinite(v)]
        counts, _ = np.histogram(finite, bins=edges)
        heights = counts * (100.0 / max(1, finite.size)) if density else counts.astype(float)
        hists.append((label, finite, counts, heights, c))
    ymax = max(float(h.max()) for _, _, _, h, _ in hists) or 1.0
    yticks, ydec = nice_ticks(0.0, ymax, 4)
    if len(yticks) > 1 and yticks[-1] < ymax:  # end the axis on a round tick above the tallest bar
        yticks.append(yticks[-1] + (yticks[1] - yticks[0]))
    if not density:
        yticks = [t for t in yticks if abs(t - round(t)) < 1e-9] or [0.0]
        ydec = 0
    ytop = max(yticks[-1], ymax)
    x0, x1 = float(edges[0]), float(edges[-1])
    xticks, xdec = nice_ticks(x0, x1, 6)
    xticks = [t for t in xticks if x0 - 1e-9 * abs(x1 - x0) <= t <= x1 + 1e-9 * abs(x1 - x0)]

    ml, mr, mt, mb = 52, 14, 12, 42
    pw, ph = width - ml - mr, height - mt - mb

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + ph - y / ytop * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc("histogram of " + xlabel)}">',
             f"<title>{esc('histogram of ' + xlabel)}</title>",
             f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff"/>']
    for t in yticks:
        y = sy(t)
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                     f'{esc(_tick_label(t, ydec))}</text>')
    for label, finite, counts, heights, c in hists:
        for i, (n, h) in enumerate(zip(counts, heights)):
            if n == 0:
                continue
            xa, xb = sx(edges[i]), sx(edges[i + 1])
            tip = f"{label}: [{fmt(edges[i])}, {fmt(edges[i + 1])}{']' if i == len(counts) - 1 else ')'}: {n}"
            parts.append(f'<rect x="{xa:.1f}" y="{sy(h):.1f}" width="{max(xb - xa, 0.5):.1f}" '
                         f'height="{sy(0) - sy(h):.1f}" fill="{c}" fill-opacity="0.28"><title>{esc(tip)}</title></rect>')
        d = [f"M{sx(edges[0]):.1f},{sy(0):.1f}"]
        for i, h in enumerate(heights):
            d.append(f"L{sx(edges[i]):.1f},{sy(h):.1f}L{sx(edges[i + 1]):.1f},{sy(h):.1f}")
        d.append(f"L{sx(edges[-1]):.1f},{sy(0):.1f}")
        parts.append(f'<path d="{"".join(d)}" fill="none" stroke="{c}" stroke-width="1.6"/>')
    for label, finite, _, _, c in hists:
        if finite.size:
            mx = sx(float(finite.mean()))
            parts.append(f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{mt}" y2="{mt + ph}" stroke="{c}" '
                         f'stroke-width="1.4" stroke-dasharray="5,3"><title>{esc(label)} mean '
                         f'{esc(fmt(float(finite.mean())))}</title></line>')
    parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" stroke="#374151"/>')
    parts.append(f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" stroke="#374151"/>')
    for t in xticks:
        x = sx(t)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 5}" stroke="#374151"/>')
        parts.append(f'<text x="{x:.1f}" y="{mt + ph + 17}" text-anchor="middle" class="tick">'
                     f'{esc(_tick_label(t, xdec))}</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" text-anchor="middle" class="axis">{esc(xlabel)}</text>')
    ylabel = "% of images" if density else "images"
    parts.append(f'<text transform="translate(13,{mt + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
                 f'class="axis">{ylabel}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# sections


def sets_section(sets: list[ScoredSet]) -> Section:
    rows = []
    for i, s in enumerate(sets):
        f = s.frame
        st = _status(f)
        stages = ", ".join(sorted({str(x) for x in _col(f, "stage").dropna()})) or "—"
        rows.append([Markup(_swatch(PALETTE[i % len(PALETTE)]) + esc(s.name)),
                     _code((s.info or {}).get("source")), len(f), int((st == "ok").sum()),
                     int((st == "error").sum()), stages, ", ".join(metric_columns(f)) or "—"])
    body = html_table(["set", "source", "rows", "ok", "error", "stages", "metric columns"], rows, {2, 3, 4})
    return Section("Sets", body, "sets")


def summary_section(sets: list[ScoredSet]) -> Section:
    table = summary_table(sets)
    metrics = _all_metrics(sets)
    fixed = [("set", "set"), ("stage", "stage"), ("preset", "preset"), ("split", "split"), ("n", "n"),
             ("n_ok", "ok"), ("n_error", "error")]
    head1 = "".join(f'<th rowspan="2"{" class=num" if k.startswith("n") else ""}>{esc(t)}</th>' for k, t in fixed)
    head2 = ""
    for m in metrics:
        arrow = "↓" if metric_direction(m) == "lower" else "↑"
        head1 += (f'<th colspan="2" class="mh" title="{esc(metric_direction(m))} is better">'
                  f"{esc(m)} {arrow}</th>")
        head2 += '<th class="num">mean</th><th class="num">median</th>'
    body = []
    for rec in table.to_dict("records"):
        cells = [f"<td>{esc(fmt(rec[k]))}</td>" for k in ("set", "stage", "preset", "split")]
        cells += [f'<td class="num">{esc(fmt(rec[k]))}</td>' for k in ("n", "n_ok", "n_error")]
        cells += [f'<td class="num">{esc(fmt(rec[f"{m}_{k}"]))}</td>' for m in metrics for k in ("mean", "median")]
        body.append("<tr>" + "".join(cells) + "</tr>")
    html_ = (f'<table class="summary"><thead><tr>{head1}</tr><tr>{head2}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>')
    if not metrics:
        html_ += _note("No metric columns in these manifests (score them with bfr-curate score).")
    html_ += _note("↓ lower is better, ↑ higher is better. Means and medians are over rows with a value.")
    return Section("Summary per set, stage and split", html_, "summary")


def _series_for(sets: list[ScoredSet], metric: str) -> list[tuple[str, np.ndarray, str]]:
    """Compared sets as series; a single set with a few splits is shown per split."""
    have = [(i, s) for i, s in enumerate(sets) if metric in s.frame.columns]
    if len(sets) == 1 and have:
        f = have[0][1].frame
        split = _col(f, "split").astype(object)
        labels = sorted({str(x) for x in split.dropna()})
        if 2 <= len(labels) + int(split.isna().any()) <= _MAX_SPLIT_SERIES:
            out = []
            for j, label in enumerate(labels):
                v = pd.to_numeric(f.loc[split == label, metric], errors="coerce").dropna().to_numpy(float)
                if v.size:
                    out.append((label, v, PALETTE[j % len(PALETTE)]))
            if split.isna().any():
                v = pd.to_numeric(f.loc[split.isna(), metric], errors="coerce").dropna().to_numpy(float)
                if v.size:
                    out.append(("(no split)", v, PALETTE[len(labels) % len(PALETTE)]))
            if len(out) > 1:
                return out
    out = []
    for i, s in have:
        v = pd.to_numeric(s.frame[metric], errors="coerce").dropna().to_numpy(float)
        if v.size:
            out.append((s.name, v, PALETTE[i % len(PALETTE)]))
    return out


def histogram_section(sets: list[ScoredSet]) -> Section:
    metrics = _all_metrics(sets)
    if not metrics:
        return Section("Histograms", _note("No metric columns to plot."), "histograms")
    blocks = []
    for m in metrics:
        direction = metric_direction(m)
        series = _series_for(sets, m)
        head = f'<h3 id="hist-{_slug(m)}">{esc(m)} <span class="dir">({esc(direction)} is better)</span></h3>'
        if not series:
            blocks.append(f'<div class="hist-block">{head}{_note("No values.")}</div>')
            continue
        svg = svg_histogram(series, f"{m} ({'← better' if direction == 'lower' else 'better →'})")
        legend = []
        for label, v, c in series:
            finite = v[np.isfinite(v)]
            extra = f", {v.size - finite.size} not finite (not plotted)" if finite.size < v.size else ""
            mean = fmt(float(finite.mean())) if finite.size else "—"
            legend.append(f'<span class="li">{_swatch(c)}{esc(label)} <small>(n={v.size}, mean {esc(mean)}'
                          f"{esc(extra)})</small></span>")
        if not svg:
            svg = _note("No finite values to plot.")
        blocks.append(f'<div class="hist-block" data-metric="{esc(m)}">{head}{svg}'
                      f'<div class="legend">{"".join(legend)}</div></div>')
    return Section("Histograms", f'<div class="hists">{"".join(blocks)}</div>', "histograms")


def _ordered(frame: pd.DataFrame, metric: str, best: bool) -> pd.DataFrame:
    """Rows with a value, best-first or worst-first; ties by image_id."""
    rows = frame[pd.to_numeric(frame[metric], errors="coerce").notna()].copy()
    rows["_v"] = pd.to_numeric(rows[metric], errors="coerce").astype(float)
    rows["_id"] = _col(rows, "image_id").astype(str)
    ascending = (metric_direction(metric) == "lower") == best
    return rows.sort_values(["_v", "_id"], ascending=[ascending, True], kind="mergesort")


def _caption(row, metric: str | None = None) -> str:
    parts = []
    if metric is not None:
        parts.append(f'<b>{esc(metric)} {esc(fmt(row.get(metric)))}</b>')
    iid = _text(row.get("image_id")) or "?"
    parts.append(f'<span class="id" title="{esc(iid)}">{esc(iid[:14])}</span>')
    split = _text(row.get("split"))
    if split:
        parts.append(f'<span class="split">{esc(split)}</span>')
    return "<br>".join(parts)


def extremes_section(sets: list[ScoredSet], n: int = 8, thumbs: Thumbnails | None = None) -> Section:
    thumbs = thumbs or Thumbnails()
    metrics = _all_metrics(sets)
    if not metrics or n <= 0:
        return Section("Worst and best images", _note("No metric columns to rank by."), "extremes")
    blocks = []
    for m in metrics:
        blocks.append(f'<h3>{esc(m)} <span class="dir">({esc(metric_direction(m))} is better)</span></h3>')
        for i, s in enumerate(sets):
            if m not in s.frame.columns:
                continue
            ranked = {"worst": _ordered(s.frame, m, best=False).head(n), "best": _ordered(s.frame, m, best=True).head(n)}
            if len(ranked["worst"]) == 0:
                continue
            label = f"{_swatch(PALETTE[i % len(PALETTE)])}{esc(s.name)}" if len(sets) > 1 else ""
            for kind, rows in ranked.items():
                figs = []
                for _, row in rows.iterrows():
                    r = row.to_dict()
                    figs.append(_figure(thumbs, r.get("uri"), r.get("image_id"), _caption(r, m),
                                        f' data-image-id="{esc(_text(r.get("image_id")) or "")}"'))
                blocks.append(f'<div class="strip" id="{kind}-{_slug(m)}-{i}" data-kind="{kind}" '
                              f'data-metric="{esc(m)}" data-set="{esc(s.name)}"><div class="strip-head">'
                              f'{label} <span class="kind {kind}">{kind} {len(rows)}</span></div>'
                              f'<div class="thumbs">{"".join(figs)}</div></div>')
    return Section("Worst and best images", "".join(blocks), "extremes")


def _spread_over_splits(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to n rows, taken round-robin over the splits (each split in image_id order)."""
    split = _col(frame, "split").astype(object)
    split = split.where(split.notna(), "")
    order = _col(frame, "image_id").astype(str)
    queues = [list(order[split == k].sort_values(kind="mergesort").index) for k in sorted(set(split))]
    picked = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return frame.loc[picked]


def before_after_section(sets: list[ScoredSet], n: int = 8, thumbs: Thumbnails | None = None) -> Section:
    thumbs = thumbs or Thumbnails()
    blocks = []
    for i, s in enumerate(sets):
        f = s.frame
        if len(f) == 0 or "parent_uri" not in f.columns:
            continue
        parent = f["parent_uri"].astype(object)
        has = parent.notna() & (parent.astype(str) != "") & (_status(f) == "ok") & _col(f, "uri").notna()
        if not has.any() or n <= 0:
            continue
        metrics = metric_columns(f)
        pairs = []
        for _, row in _spread_over_splits(f[has], n).iterrows():
            r = row.to_dict()
            stage = _text(r.get("stage")) or "image"
            values = " · ".join(f"{m} {fmt(r.get(m))}" for m in metrics if not _missing(r.get(m)))
            after_cap = _caption(r) + (f'<br><span class="vals">{esc(values)}</span>' if values else "")
            pid = _text(r.get("parent_id")) or "?"
            before_cap = f'parent<br><span class="id" title="{esc(pid)}">{esc(pid[:14])}</span>'
            pairs.append(f'<div class="pair" data-image-id="{esc(_text(r.get("image_id")) or "")}">'
                         f'{_figure(thumbs, r.get("parent_uri"), pid, before_cap)}'
                         f'{_figure(thumbs, r.get("uri"), r.get("image_id"), f"<i>{esc(stage)}</i><br>" + after_cap)}'
                         f"</div>")
        head = f"<h3>{_swatch(PALETTE[i % len(PALETTE)])}{esc(s.name)}</h3>" if len(sets) > 1 else ""
        blocks.append(f'{head}<div class="pairs">{"".join(pairs)}</div>')
    if not blocks:
        return Section("Before / after", _note("No rows with a known parent image."), "before-after")
    return Section("Before / after", _note("Each pair: the parent image (left) and the image (right).")
                   + "".join(blocks), "before-after")


def errors_section(sets: list[ScoredSet], limit: int = _MAX_ERROR_ROWS) -> Section:
    blocks = []
    total = 0
    for i, s in enumerate(sets):
        f = s.frame
        err = f[_status(f) == "error"]
        total += len(err)
        head = f"<h3>{_swatch(PALETTE[i % len(PALETTE)])}{esc(s.name)}</h3>" if len(sets) > 1 else ""
        if len(err) == 0:
            blocks.append(head + _note("No error rows."))
            continue
        reasons = _col(err, "error").astype(object).where(_col(err, "error").notna(), "(no reason given)")
        counts = reasons.value_counts(sort=True)
        count_rows = [[r, c] for r, c in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
        first = err.head(limit)
        rows = []
        for _, row in first.iterrows():
            r = row.to_dict()
            source = r.get("parent_uri") if not _missing(r.get("parent_uri")) else r.get("uri")
            rows.append([r.get("image_id"), r.get("split"), _code(source), r.get("error")])
        shown = f"first {len(first)} of {len(err)}" if len(err) > len(first) else f"all {len(err)}"
        blocks.append(f"{head}<p><b>{len(err)}</b> error row{'s' if len(err) != 1 else ''} of {len(f)}.</p>"
                      + html_table(["error", "rows"], count_rows, {1}, cls="counts")
                      + f"<p class=note>Error rows ({esc(shown)}):</p>"
                      + html_table(["image_id", "split", "parent_uri", "error"], rows, cls="errors"))
    return Section(f"Errors ({total})", "".join(blocks), "errors")


def _conventions_by_metric(sets: list[ScoredSet]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for s in sets:
        for metric, text in ((s.info or {}).get("conventions") or {}).items():
            out.setdefault(str(metric), {})[s.name] = str(text)
    return out


def conventions_section(sets: list[ScoredSet]) -> Section:
    conv = _conventions_by_metric(sets)
    parts = []
    if not conv:
        parts.append(_note("The manifests record no metric conventions."))
    else:
        rows = []
        for metric, by_set in conv.items():
            texts = list(dict.fromkeys(by_set.values()))
            if len(texts) == 1:
                names = "all" if len(by_set) == len(sets) else ", ".join(by_set)
                rows.append([metric, names, texts[0]])
            else:
                for name, text in by_set.items():
                    rows.append([Markup(f'{esc(metric)} <span class="warn">differs</span>'), name, text])
        parts.append(html_table(["metric", "sets", "convention (as recorded by the score stage)"], rows,
                                cls="conv"))
        if any(len(set(b.values())) > 1 for b in conv.values()):
            parts.append('<p class="warn">Some metrics were computed with different conventions in the compared '
                         "sets: their values are not comparable.</p>")
    parts.append("<p class=note>This report: a metric column is a numeric column named after a known metric "
                 "(optionally with a suffix such as <code>psnr_y</code>); means and medians skip missing values; "
                 "histograms share bins over the pooled finite values and mark each mean with a dashed line; "
                 "best/worst ties are broken by image_id.</p>")
    return Section("Metric conventions", "".join(parts), "conventions")


def not_computed_section(sets: list[ScoredSet]) -> Section:
    rows = []
    for s in sets:
        for r in (s.info or {}).get("not_computed") or []:
            detail = r.get("detail")
            reason = r.get("reason") or "not computed"
            rows.append([r.get("metric"), s.name,
                         Markup(esc(reason) + (f'<br><small>{esc(detail)}</small>' if detail else "")),
                         _code(r.get("needs")), _code(r.get("command"))])
    if not rows:
        return Section("Not computed", _note("Every requested metric was computed."), "not-computed")
    body = (_note("These metrics were requested but not computed. Fetch the file each needs with the command "
                  "shown (on a machine with internet, or copy it into the model cache), then score again.")
            + html_table(["metric", "set", "reason", "needs file", "command"], rows, cls="nc"))
    return Section(f"Not computed ({len(rows)})", body, "not-computed")


def set_metrics_section(sets: list[ScoredSet]) -> Section:
    found = [(s.name, (s.info or {}).get("set_metrics") or {}) for s in sets]
    found = [(n, sm) for n, sm in found if sm]
    if not found:
        return Section("Set-level metrics", _note("No set-level metrics (FID) were computed."), "set-metrics")
    keys = list(dict.fromkeys(k for _, sm in found for k in sm))
    rows = []
    for name, sm in found:
        rows.append([name] + [(_code(sm[k]) if isinstance(sm.get(k), str) and ("/" in sm[k] or ":" in sm[k])
                               else sm.get(k)) for k in keys])
    numeric = {i + 1 for i, k in enumerate(keys) if all(isinstance(sm.get(k), (int, float)) for _, sm in found)}
    body = html_table(["set", *keys], rows, numeric, cls="setm")
    conventions = {sm.get("fid_convention") for _, sm in found if sm.get("fid_convention")}
    if len(conventions) > 1:
        body += '<p class="warn">FID was computed with different conventions: the values are not comparable.</p>'
    return Section("Set-level metrics", body, "set-metrics")


# --------------------------------------------------------------------------------------------
# the page

CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--head:#f3f4f6;--accent:#0072B2}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
 margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 24px 60px;background:#fff}
h1{font-size:24px;margin:6px 0 10px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}
nav{font-size:13px;margin:4px 0 10px}
nav a{margin-right:12px;color:var(--accent);text-decoration:none;white-space:nowrap}
nav a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600}
th.mh{text-align:center}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fbfbfc}
.summary{font-size:12.5px}
.summary td,.summary th{white-space:nowrap;padding:3px 6px}
.summary td:first-child{white-space:normal;min-width:90px}
.scroll{overflow-x:auto}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;padding:1px 4px;
 border-radius:3px;word-break:break-all}
.note{color:var(--muted);font-size:12.5px;margin:4px 0}
.warn{color:#b45309;font-weight:600}
.banner{background:#fff7ed;border:1px solid #fdba74;border-radius:6px;padding:8px 12px;margin:10px 0}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.dir{color:var(--muted);font-weight:400;font-size:13px}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:6px 18px}
.hist-block h3{margin-bottom:2px}
svg.hist{display:block;font-family:inherit}
svg.hist .tick{font-size:11px;fill:#4b5563}
svg.hist .axis{font-size:12px;fill:#111827}
.legend{font-size:12.5px;margin:0 0 6px 52px}
.legend .li{margin-right:14px;display:inline-block}
.legend small{color:var(--muted)}
.strip{margin:6px 0 10px}
.strip-head{font-size:13px;margin-bottom:3px}
.kind{font-weight:600;text-transform:uppercase;font-size:11.5px;letter-spacing:.04em;padding:1px 6px;border-radius:3px}
.kind.worst{background:#fee2e2;color:#991b1b}
.kind.best{background:#dcfce7;color:#166534}
.thumbs,.pairs{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;display:flex;flex-direction:column;align-items:center}
figure.thumb img{display:block;border:1px solid var(--line);background:#eee}
figure.thumb img.up{image-rendering:pixelated}
figcaption{font-size:11px;line-height:1.3;text-align:center;margin-top:2px;overflow-wrap:anywhere}
figcaption .id{font-family:ui-monospace,Menlo,Consolas,monospace;color:var(--muted)}
figcaption .split,figcaption .vals{color:var(--muted)}
.pair{display:flex;gap:3px;padding:4px;border:1px solid var(--line);border-radius:6px;background:#fcfcfd}
.ph{display:flex;flex-direction:column;align-items:center;justify-content:center;text-align:center;
 background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 6px,#e5e7eb 6px,#e5e7eb 12px);
 border:1px dashed #9ca3af;color:#6b7280;font-size:11px;padding:4px;overflow:hidden}
.ph small{font-size:9.5px;overflow-wrap:anywhere}
table.errors td:last-child,table.nc td{max-width:520px;overflow-wrap:anywhere}
footer{margin-top:40px;color:var(--muted);font-size:12px}
"""


def search_section(searches: list[tuple[str, dict]]) -> Section:
    """The ``pseudo-targets --auto`` searches: every candidate's quality and fidelity, the choice marked."""
    parts = []
    for stage, search in searches:
        metric = search["metric"]
        grid = search["grid"]
        knobs = [k for k in ("N", "tau", "omega", "K", "L", "n2", "respace") if any(k in g for g in grid)]
        rows = [["✓" if i == search["chosen"] else "", *[g.get(k) for k in knobs], g[metric], g["lf_psnr"],
                 g.get("noise_sigma")] for i, g in enumerate(grid)]
        arrow = "↑" if metric == "musiq" else "↓"
        parts.append(f"<h3>{esc(stage)}</h3>" + html_table(
            ["chosen", *knobs, f"{metric} {arrow}", "lf_psnr ↑", "noise_sigma ↓"], rows,
            set(range(1, len(knobs) + 4))))
        parts.append(_note(f"{search['reason']}. Fidelity: {search['fidelity']}; limit {search['fidelity_limit']} dB. "
                           f"Scored on {len(search['sample_ids'])} sampled inputs."))
    return Section("Pseudo-target parameter search (--auto)", "".join(parts), "auto-search")


# DifBFSR's Table 1 (CelebA-Test x4, mean over the 8 Gaussian8 cases), as printed (difbfsr.md §8.1)
DIFBFSR_TABLE1 = {"psnr": 25.27, "ssim": 0.7349, "lpips": 0.2276, "niqe": 5.81, "pi": 5.49, "nrqm": 5.11, "fid": 77.46}
_CASE_RE = re.compile(r"difbfsr-gaussian8/case(\d+)$")


def protocol_table(frame: pd.DataFrame, set_metrics: dict | None = None) -> pd.DataFrame | None:
    """Per-case means of the Table 1 metrics, their mean over the cases, and the paper's row.

    None when the rows carry no difbfsr-gaussian8 case. FID is set-level: on the mean row only.
    """
    if "split" not in frame or not len(frame):
        return None
    cases = frame["split"].astype(str).str.extract(_CASE_RE)[0].astype(float)
    ok = frame[cases.notna() & (_status(frame) == "ok")]
    if not len(ok):
        return None
    cols = [m for m in DIFBFSR_TABLE1 if m != "fid"]
    per_case = ok.assign(case=cases[ok.index].astype(int)).groupby("case")[[c for c in cols if c in ok]].mean()
    per_case = per_case.reindex(columns=cols)
    table = per_case.rename(index=lambda k: f"case {k}")
    mean = per_case.mean(axis=0, skipna=False).to_frame("mean over cases").T
    table = pd.concat([table, mean])
    table["fid"] = np.nan
    table.loc["mean over cases", "fid"] = (set_metrics or {}).get("fid", np.nan)
    table.loc["DifBFSR (paper, Table 1)"] = pd.Series(DIFBFSR_TABLE1)
    return table


def protocol_section(sets: list[ScoredSet]) -> Section | None:
    """DifBFSR's Table 1 layout for every set whose rows carry difbfsr-gaussian8 cases."""
    parts = []
    for s in _distinct(sets):
        table = protocol_table(s.frame, (s.info or {}).get("set_metrics"))
        if table is None:
            continue
        header = ["", *[f"{m.upper() if m != 'lpips' else 'LPIPS-VGG'} {'↓' if metric_direction(m) == 'lower' else '↑'}"
                        for m in table.columns]]
        rows = [[name, *[("not computed" if _missing(v) and not name.startswith("case") else v) for v in row]]
                for name, row in zip(table.index, table.itertuples(index=False))]
        parts.append(f"<h3>{esc(s.name)}</h3>" + html_table(header, rows, set(range(1, len(header)))))
    if not parts:
        return None
    note = _note("Cases 1 (hardest) to 8 (easiest) of the linked Gaussian8 schedule (difbfsr.md §2.3); the mean "
                 "is over the cases, as the paper reports. The last row is the paper's printed DifBFSR result "
                 "(100 CelebA-HQ faces, its own prior and FID stack): a reference, not a target to match.")
    return Section("DifBFSR protocol (Table 1 layout)", "".join(parts) + note, "difbfsr-table1")


def render_page(title: str, sections: list[Section], intro_html: str = "") -> str:
    """A complete HTML document of sections, with a table of contents."""
    used: set[str] = set()
    ids = []
    for k, s in enumerate(sections):
        sid = _slug(s.id or s.heading)
        while sid in used:
            sid = f"{sid}-{k}"
        used.add(sid)
        ids.append(sid)
    nav = " ".join(f'<a href="#{sid}">{esc(s.heading)}</a>' for sid, s in zip(ids, sections))
    body = "".join(f'<section id="{sid}"><h2>{esc(s.heading)}</h2>{s.html}</section>'
                   for sid, s in zip(ids, sections))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><nav>{nav}</nav>{intro_html}{body}"
            "<footer>Generated by bfr-curate. Self-contained: images are embedded thumbnails.</footer>"
            "</main></body></html>\n")


def report_sections(sets: list[ScoredSet], n_extremes: int = 8, thumb_size: int = 128) -> list[Section]:
    """The standard sections of a quality report, in order."""
    sets = _distinct(sets)
    thumbs = Thumbnails(thumb_size)
    summary = summary_section(sets)
    summary.html = f'<div class="scroll">{summary.html}</div>'
    protocol = protocol_section(sets)
    return [sets_section(sets), summary, *([protocol] if protocol else []), not_computed_section(sets),
            set_metrics_section(sets),
            histogram_section(sets), extremes_section(sets, n_extremes, thumbs),
            before_after_section(sets, n_extremes, thumbs), errors_section(sets), conventions_section(sets)]


def render_report(sets: list[ScoredSet], title: str = "bfr-curate quality report", n_extremes: int = 8,
                  thumb_size: int = 128, extra_sections: list[tuple[str, str]] = ()) -> str:
    """The whole report as one HTML string; ``extra_sections`` are (heading, trusted html) pairs
    appended after the standard sections."""
    sets = _distinct(sets)
    sections = report_sections(sets, n_extremes, thumb_size)
    sections += [Section(str(heading), body) for heading, body in extra_sections]
    intro = ""
    n_missing = sum(len((s.info or {}).get("not_computed") or []) for s in sets)
    if n_missing:
        names = sorted({str(r.get("metric")) for s in sets for r in ((s.info or {}).get("not_computed") or [])})
        intro = (f'<div class="banner"><b>{n_missing} metric{"s" if n_missing != 1 else ""} not computed</b> '
                 f'({esc(", ".join(names))}): see <a href="#not-computed">Not computed</a> for the file each '
                 "needs.</div>")
    if not sets:
        intro += _note("No manifests given.")
    return render_page(title, sections, intro)


def write_report(html: str, out_uri: str) -> str:
    """Write the report atomically (local path or fsspec URL); returns the URI."""
    storage.write_bytes_atomic(out_uri, html.encode("utf-8"))
    return out_uri
