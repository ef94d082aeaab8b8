"""Tables of the report: the summary per set/stage/split (HTML and markdown), sets, set-level metrics, what was
not computed, errors, metric conventions, the --auto search and the DifBFSR protocol layout."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from bfr_models.report.base import (_MAX_ERROR_ROWS, PALETTE, Markup, ScoredSet, Section, _all_metrics, _code, _col,
                                    prepared, _missing, _note, _preset, _status, _swatch, esc, fmt, html_table,
                                    metric_columns, metric_direction)

def summary_table(sets: list[ScoredSet]) -> pd.DataFrame:
    """One row per (set, stage, split): counts, and the mean and median of each metric column.

    Columns: set, stage, preset, split, n, n_ok, n_error, then ``<metric>_mean`` and
    ``<metric>_median`` for every metric column of any set (NaN where a set lacks it). A set with
    no rows gives one row with n = 0 so it still shows."""
    sets = prepared(sets)
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
    sets = prepared(sets)
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
    nc = not_computed(sets)
    if nc:
        out += ["", "## Not computed", ""]
        for r, names in nc:
            line = f"- **{_md_cell(r.get('metric'))}** ({_md_cell(', '.join(names))}): " \
                   f"{_md_cell(r.get('reason') or 'not computed')}"
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
    if any("replaced" in s.frame.columns and (_col(s.frame, "stage") == "clean").any() for s in sets):
        html_ += _note("Clean rows: *_after scores count only the accepted candidates (the images the cleaned set "
                       "holds); every candidate's scores are in the cleaning section.")
    return Section("Summary per set, stage and split", html_, "summary")


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


def not_computed(sets: list[ScoredSet]) -> list[tuple[dict, list[str]]]:
    """Each distinct not-computed record (metric, reason, needs, command) once, with the sets it applies to."""
    grouped: dict[tuple, tuple[dict, list[str]]] = {}
    for s in sets:
        for r in (s.info or {}).get("not_computed") or []:
            key = tuple(str(r.get(k)) for k in ("metric", "reason", "detail", "needs", "command"))
            grouped.setdefault(key, (r, []))[1].append(s.name)
    return list(grouped.values())


def not_computed_section(sets: list[ScoredSet]) -> Section:
    rows = []
    for r, names in not_computed(sets):
        detail = r.get("detail")
        reason = r.get("reason") or "not computed"
        rows.append([r.get("metric"), "all" if len(names) == len(sets) > 1 else ", ".join(names),
                     Markup(esc(reason) + (f'<br><small>{esc(detail)}</small>' if detail else "")),
                     _code(r.get("needs")), _code(r.get("command"))])
    if not rows:
        return Section("Not computed", _note("Every requested metric was computed."), "not-computed")
    body = (_note("These metrics were requested but not computed. Fetch the file each needs with the command "
                  "shown (on a machine with internet, or copy it into the model cache), then score again.")
            + html_table(["metric", "sets", "reason", "needs file", "command"], rows, cls="nc"))
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
    for s in prepared(sets):
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


