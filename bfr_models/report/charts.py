"""Inline SVG charts: round ticks and overlaid histograms of the metric columns."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bfr_models.report.base import (_MAX_SPLIT_SERIES, PALETTE, ScoredSet, Section, _all_metrics, _col, _note, _slug,
                                    _swatch, esc, fmt, metric_direction)

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


