"""Report sections of the training stages: fine-tuning curves and IDM cleaning.

Plain functions from a stage's log or manifest to a :class:`~bfr_models.report.Section`; no Prefect.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bfr_models.report import (PALETTE, Section, Thumbnails, _figure, _note, _slug, _swatch, _tick_label, esc, fmt,
                               html_table, nice_ticks, svg_histogram)

FINETUNE_PANELS = (("training loss", ("loss", "l1", "lpips", "gan", "d_loss")),
                   ("validation L1 (lower is better)", ("val_l1", "val_l1_gt")),
                   ("validation PSNR (dB, higher is better)", ("val_psnr", "val_psnr_gt")),
                   ("validation SSIM (higher is better)", ("val_ssim", "val_ssim_gt")),
                   ("validation LPIPS (lower is better)", ("val_lpips", "val_lpips_gt")))


def svg_lines(series: list[tuple[str, np.ndarray, np.ndarray, str]], xlabel: str, width: int = 540,
              height: int = 220) -> str:
    """An inline SVG line chart of (label, x, y, colour) series on shared axes; '' when nothing is finite."""
    pts = [(label, np.asarray(x, float), np.asarray(y, float), c) for label, x, y, c in series]
    pts = [(label, x[np.isfinite(y)], y[np.isfinite(y)], c) for label, x, y, c in pts]
    pts = [p for p in pts if p[1].size]
    if not pts:
        return ""
    xs, ys = np.concatenate([p[1] for p in pts]), np.concatenate([p[2] for p in pts])
    x0, x1 = float(xs.min()), float(xs.max()) or 1.0
    y0, y1 = float(ys.min()), float(ys.max())
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    left, right, top, bottom = 56, 12, 10, 36
    pw, ph = width - left - right, height - top - bottom

    def sx(v):
        return left + (v - x0) / ((x1 - x0) or 1.0) * pw

    def sy(v):
        return top + (1 - (v - y0) / (y1 - y0)) * ph

    ticks, dec = nice_ticks(y0, y1)
    grid = "".join(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 4}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{_tick_label(t, dec)}</text>'
                   for t in ticks if y0 <= t <= y1)
    lines = []
    for label, x, y, c in pts:
        path = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, y))
        marker = "".join(f'<circle cx="{sx(a):.1f}" cy="{sy(b):.1f}" r="2.5" fill="{c}"/>' for a, b in zip(x, y)) if x.size <= 50 else ""
        lines.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.5"><title>{esc(label)}</title></polyline>{marker}')
    axis = (f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{esc(xlabel)}</text>'
            f'<text x="{left}" y="{height - 20}" font-size="10">{fmt(x0)}</text>'
            f'<text x="{left + pw}" y="{height - 20}" text-anchor="end" font-size="10">{fmt(x1)}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
            f'{grid}{"".join(lines)}{axis}</svg>')


def finetune_section(name: str, log: pd.DataFrame, info: dict) -> Section:
    """Loss and validation curves of a fine-tuning run, and its final validation scores."""
    blocks = []
    for title, columns in FINETUNE_PANELS:
        series = [(c, log["step"].to_numpy(), pd.to_numeric(log[c], errors="coerce").to_numpy(), PALETTE[i % len(PALETTE)])
                  for i, c in enumerate(columns) if c in log.columns]
        svg = svg_lines(series, "step")
        if not svg:
            continue
        legend = "".join(f'<span class="li">{_swatch(c)}{esc(label)}</span>' for label, _, _, c in series)
        blocks.append(f'<div class="hist-block"><h3>{esc(title)}</h3>{svg}<div class="legend">{legend}</div></div>')
    final = info.get("final_validation") or {}
    table = html_table(["measure", "final value"], [[k, fmt(v)] for k, v in sorted(final.items())], numeric={1})
    restorer = info.get("restorer") or {}
    intro = _note(f"{name}: {restorer.get('arch', '?')} restorer, {info.get('train_pairs', '?')} training pairs, "
                  f"{info.get('val_pairs', '?')} held out, {int(log['step'].max()) if len(log) else 0} steps. "
                  f"Validation compares R(LQ) with the pseudo targets (and, *_gt, with the ground truth).")
    return Section(f"Fine-tuning: {name}", intro + f'<div class="hists">{"".join(blocks)}</div>' + table,
                   f"finetune-{_slug(name)}")


def clean_section(name: str, frame: pd.DataFrame, info: dict, thumbs: Thumbnails, n: int = 8) -> Section:
    """IDM cleaning: acceptance rate per round, NIQE before/after, FID cleaned vs original, before/after grids."""
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    rounds = info.get("rounds") or []
    rows = [[r["round"], r["images"], r["replaced"], fmt(r["replaced"] / r["images"] if r["images"] else float("nan")),
             r.get("errors", 0)] for r in rounds]
    parts = [html_table(["round", "images", "replaced", "acceptance rate", "error rows"], rows, numeric={1, 2, 3, 4})]
    fid = (info.get("set_metrics") or {}).get("fid_cleaned_vs_original")
    if fid:
        parts.append(_note(f"FID between the cleaned set and the original images: {fmt(fid.get('fid'))} "
                           f"({fid.get('n', '?')} images, clean-fid convention)."))
    else:
        missing = [r for r in info.get("not_computed") or [] if r.get("metric") == "fid"]
        if missing:
            parts.append(_note(f"FID cleaned vs original not computed: needs {missing[0]['needs']} "
                               f"({missing[0]['command']})."))
    for metric in ("niqe", "musiq"):
        before, after = f"{metric}_before", f"{metric}_after"
        if before not in ok.columns:
            continue
        b = pd.to_numeric(ok[before], errors="coerce").to_numpy(float)
        kept = np.where(ok["replaced"].astype(bool), pd.to_numeric(ok[after], errors="coerce"), b)
        svg = svg_histogram([("original", b, PALETTE[0]), ("cleaned dataset", kept, PALETTE[2])], f"{metric}")
        if svg:
            parts.append(f'<h3>{metric.upper()} before and after</h3>{svg}<div class="legend">'
                         f'<span class="li">{_swatch(PALETTE[0])}original (mean {fmt(np.nanmean(b))})</span>'
                         f'<span class="li">{_swatch(PALETTE[2])}cleaned dataset (mean {fmt(np.nanmean(kept))})</span></div>')
        accepted = ok["replaced"].astype(bool).to_numpy()
        a = pd.to_numeric(ok[after], errors="coerce").to_numpy(float)
        if accepted.any():  # the replaced images' own scores; a rejected candidate's is not the cleaned set's
            parts.append(_note(f"{metric}_after over the {int(accepted.sum())} accepted candidates (the images the "
                               f"cleaned set holds): mean {fmt(np.nanmean(a[accepted]))}, from "
                               f"{fmt(np.nanmean(b[accepted]))} before; over all {len(a)} candidates, accepted or "
                               f"not: {fmt(np.nanmean(a))}."))
    grids = []
    for replaced, title in ((True, "replaced"), (False, "kept original (rejected x*)")):
        pick = ok[ok["replaced"].astype(bool) == replaced].head(n)
        pairs = []
        for r in pick.to_dict("records"):
            reasons = r.get("reasons")  # None (NaN once read back) for accepted candidates
            caption = esc(reasons if isinstance(reasons, str) and reasons
                          else f"NIQE {fmt(r.get('niqe_before'))} -> {fmt(r.get('niqe_after'))}")
            pairs.append(f'<div class="pair">{_figure(thumbs, r.get("source_uri"), r.get("parent_id"), "original x")}'
                         f'{_figure(thumbs, r.get("candidate_uri"), r.get("image_id"), "x* = f(x)<br>" + caption)}</div>')
        if pairs:
            grids.append(f'<h3>{esc(title)}</h3><div class="pairs">{"".join(pairs)}</div>')
    parts += grids or [_note("No cleaned images.")]
    return Section(f"Cleaning: {name}", "".join(parts), f"clean-{_slug(name)}")


def trained_prior_note(source: dict | None, images: int | None = None) -> str | None:
    """What a prior trained by ``bfr-curate prior train`` (the demo's) shows and does not; None for other priors."""
    if not isinstance(source, dict) or source.get("trained_by") != "bfr-curate prior train":
        return None
    cfg = source.get("config") or {}
    on = f" on {images} faces" if images else " on the run's own faces"
    return (f"The prior was trained offline{on} ({cfg.get('resolution', '?')} px, {source.get('step', '?')} steps): "
            f"a toy that demonstrates the pipeline, not the quality a published prior gives "
            f"(bfr-curate models pull ffhq512_iddpm_difface).")


def _prior_source(ok: pd.DataFrame) -> dict | None:
    import json

    params = ok["params"].dropna() if "params" in ok else []
    return (json.loads(params.iloc[0]).get("prior") or {}).get("source") if len(params) else None


def gate_section(name: str, frame: pd.DataFrame, info: dict, thumbs: Thumbnails, n: int = 8) -> Section:
    """The pseudo-target quality gate: pass rate, failures per check, checks not made, a grid of failed targets
    (input | target, with the reasons)."""
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    gate = info.get("gate") or {}
    if "gate" not in ok.columns:
        return Section(f"Quality gate: {name}", _note("This stage ran before the quality gate existed: no gate columns."),
                       f"gate-{_slug(name)}")
    failed = ok[ok["gate"] == "fail"]
    passed = len(ok) - len(failed)
    counts: dict[str, int] = {}
    for text in failed["gate_reason"].dropna():
        for check in {part.split(":")[0] for part in text.split("; ")}:
            counts[check] = counts.get(check, 0) + 1
    parts = [_note(f"{passed} of {len(ok)} targets passed the gate "
                   f"({f'{100 * passed / len(ok):.0f} %' if len(ok) else 'n/a'}); failed targets stay in the manifest "
                   f"(gate = fail) and are left out of fine-tuning pairs unless --include-failed.")]
    toy = trained_prior_note(_prior_source(ok))
    if toy:
        parts.append(f'<p class="note"><b>{esc(toy)}</b></p>')
    if counts:
        parts.append(html_table(["check", "targets failing it"], sorted(counts.items(), key=lambda kv: -kv[1]),
                                numeric={1}))
    for r in gate.get("not_checked") or []:
        parts.append(_note(f"Not checked: {r['metric']} ({r.get('command') or r.get('reason')})."))
    thresholds = gate.get("thresholds") or {}
    if thresholds:
        parts.append(html_table(["threshold", "value"], sorted(thresholds.items()), numeric={1}))
    pairs = []
    for r in failed.head(n).to_dict("records"):
        pairs.append(f'<div class="pair">{_figure(thumbs, r.get("parent_uri"), r.get("parent_id"), "input")}'
                     f'{_figure(thumbs, r.get("uri"), r.get("image_id"), "target<br>" + esc(r.get("gate_reason")))}</div>')
    if pairs:
        parts.append(f'<h3>failed targets ({min(n, len(failed))} of {len(failed)})</h3><div class="pairs">{"".join(pairs)}</div>')
    return Section(f"Quality gate: {name}", "".join(parts), f"gate-{_slug(name)}")
