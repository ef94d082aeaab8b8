"""``report --compare``: the compared sets' images paired with the first set's, per-image differences and the
fraction of pairs each metric improved.

Rows are paired by lineage where it links them, else by name: a compared row whose parent is a first-set row
(a restoration of that degraded image) or the other way round, rows with the same parent (two restorations of
one input), the same ``source_name`` and split, the same ``source_name``, the same image_id. The rule that
pairs the most rows is used; a key that repeats within a set pairs none of its rows (ambiguous).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from bfr_models.report.base import (ScoredSet, Section, _col, _note, _status, _swatch, PALETTE, esc, html_table,
                                    metric_columns, metric_direction)
from bfr_models.report.table_view import Column, data_table

# (first set's key columns, compared set's key columns, how the report names the rule)
PAIRING_RULES = ((("image_id",), ("parent_id",), "lineage: the compared image's parent is the first set's image"),
                 (("parent_id",), ("image_id",), "lineage: the first set's image's parent is the compared image"),
                 (("parent_id",), ("parent_id",), "lineage: the same parent image"),
                 (("source_name", "split"), ("source_name", "split"), "the same source name and split"),
                 (("source_name",), ("source_name",), "the same source name"),
                 (("image_id",), ("image_id",), "the same image_id"))


def _keyed(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """The ok rows whose key (all columns present) is unique, indexed by the key."""
    ok = frame[_status(frame) == "ok"]
    if any(c not in ok.columns for c in columns):
        return ok.iloc[:0]
    ok = ok.dropna(subset=list(columns))
    key = ok[columns[0]].astype(str)
    for c in columns[1:]:
        key = key + "\x00" + ok[c].astype(str)
    ok = ok.set_axis(key.to_numpy())
    return ok[~ok.index.duplicated(keep=False)]


def pair_rows(base: ScoredSet, other: ScoredSet) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The paired rows of two sets (aligned, same length) and the rule that paired them ('' when none did)."""
    best = (base.frame.iloc[:0], other.frame.iloc[:0], "")
    for left, right, rule in PAIRING_RULES:
        a, b = _keyed(base.frame, left), _keyed(other.frame, right)
        common = a.index.intersection(b.index, sort=False)
        if len(common) > len(best[0]):
            best = (a.loc[common], b.loc[common], rule)
    return best


def paired_deltas(base: ScoredSet, other: ScoredSet) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Per metric of both sets: pairs with both values, the two means, mean and median of (compared - first), and
    the fractions of pairs improved / worse / unchanged (by the metric's direction); with the per-pair deltas
    (``source_name``, ``split``, ``<metric>_delta``) and the pairing rule."""
    a, b, rule = pair_rows(base, other)
    metrics = [m for m in metric_columns(other.frame) if m in metric_columns(base.frame)]
    records = []
    per_image = pd.DataFrame({"source_name": _col(b, "source_name").where(_col(b, "source_name").notna(),
                                                                             _col(b, "image_id")).to_numpy(),
                              "split": _col(b, "split").to_numpy(), "image_id": _col(b, "image_id").to_numpy()})
    for m in metrics:
        x = pd.to_numeric(a[m], errors="coerce").to_numpy(float)
        y = pd.to_numeric(b[m], errors="coerce").to_numpy(float)
        with np.errstate(invalid="ignore"):
            delta = y - x
        per_image[f"{m}_delta"] = delta
        both = ~np.isnan(x) & ~np.isnan(y)
        n = int(both.sum())
        better = (y > x) if metric_direction(m) == "higher" else (y < x)
        improved, same = int((better & both).sum()), int(((x == y) & both).sum())
        finite = delta[both & np.isfinite(delta)]
        records.append({"metric": m, "pairs": n, "mean_first": float(np.mean(x[both])) if n else np.nan,
                        "mean_compared": float(np.mean(y[both])) if n else np.nan,
                        "mean_delta": float(finite.mean()) if finite.size else np.nan,
                        "median_delta": float(np.median(finite)) if finite.size else np.nan,
                        "improved": improved / n if n else np.nan, "worse": (n - improved - same) / n if n else np.nan,
                        "unchanged": same / n if n else np.nan})
    return pd.DataFrame.from_records(records, columns=["metric", "pairs", "mean_first", "mean_compared", "mean_delta",
                                                       "median_delta", "improved", "worse", "unchanged"]), per_image, rule


def _pct(v) -> str:
    return "—" if pd.isna(v) else f"{100 * v:.0f} %"


def compare_section(sets: list[ScoredSet]) -> Section | None:
    """For each compared set, its images paired with the first set's: the summary per metric and a sortable
    table of per-image deltas. None with a single set."""
    if len(sets) < 2:
        return None
    base, parts = sets[0], []
    for i, other in enumerate(sets[1:], start=1):
        summary, per_image, rule = paired_deltas(base, other)
        head = f"<h3>{_swatch(PALETTE[i % len(PALETTE)])}{esc(other.name)} vs {esc(base.name)}</h3>"
        if not rule:
            parts.append(head + _note("No rows could be paired (no shared lineage, source name or image_id)."))
            continue
        parts.append(head + _note(f"{len(per_image)} pairs by {rule}. Δ = compared − first; improved means better "
                                  "by the metric's direction."))
        rows = [[r["metric"] + (" ↓" if metric_direction(r["metric"]) == "lower" else " ↑"), r["pairs"],
                 r["mean_first"], r["mean_compared"], r["mean_delta"], r["median_delta"], _pct(r["improved"]),
                 _pct(r["worse"]), _pct(r["unchanged"])] for r in summary.to_dict("records")]
        parts.append(html_table(["metric", "pairs", f"mean ({base.name})", f"mean ({other.name})", "mean Δ",
                                 "median Δ", "improved", "worse", "unchanged"], rows, set(range(1, 9)), cls="paired"))
        columns = [Column("source_name"), Column("split", "cat"), Column("image_id")]
        columns += [Column(f"{m}_delta", "num", metric_direction(m), f"compared − first; {metric_direction(m)} is better")
                    for m in summary["metric"]]
        parts.append(data_table(f"paired-{i}", per_image, columns, filters=("split",)))
    return Section("Paired comparison", "".join(parts), "paired")

