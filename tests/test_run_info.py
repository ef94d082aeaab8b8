"""What a stage run shows in Prefect: artifact keys Prefect accepts, the summary table's figures."""

from __future__ import annotations

import pandas as pd

from flows.run_info import artifact_key, key_figures, summary_rows


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert artifact_key("pseudo-targets", "3F2A9c1E07bd") == "pseudo-targets-3f2a9c1e07bd"
    assert artifact_key("quality summary", "/tmp/Run 1/x.parquet") == "quality-summary-tmp-run-1-x-parquet"


def test_summary_counts_rows_gate_replacements_and_means_per_split():
    df = pd.DataFrame({"status": ["ok", "ok", "error", "ok"], "split": ["mild", "mild", "mild", None],
                       "gate": ["pass", "fail", None, "pass"], "replaced": [True, False, None, True],
                       "niqe": [4.0, 6.0, None, 8.0]})
    rows = {r["split"]: r for r in summary_rows(df)}
    assert rows["mild"] == {"split": "mild", "rows": 3, "ok": 2, "error": 1, "gate_pass": 1, "replaced": 1,
                            "mean_niqe": 5.0}
    assert rows["all"]["rows"] == 4 and rows["all"]["replaced"] == 2 and rows["all"]["mean_niqe"] == 6.0
    assert rows["-"]["rows"] == 1
    assert summary_rows(df.iloc[:0]) == [{"split": "all", "rows": 0, "ok": 0, "error": 0, "gate_pass": 0,
                                          "replaced": 0, "mean_niqe": None}]


def test_key_figures_say_what_the_index_records():
    lines = key_figures({"set_metrics": {"fid": {"value": 12.5}}, "skipped_inputs": 2,
                         "rounds": [{"round": 1, "replaced": 11, "images": 20}],
                         "not_computed": [{"metric": "musiq", "needs": "musiq_koniq"}]})
    assert lines == ["fid: 12.5", "round 1: 11 of 20 images replaced", "not computed: musiq (needs musiq_koniq)",
                     "skipped input files: 2"]
