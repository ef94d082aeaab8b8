"""The report: one self-contained HTML file, and the same summary as Prefect artifacts."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bfr_models import manifest, storage
from bfr_models.report import ScoredSet, render_report, summary_markdown, summary_table, write_report


def load_scored(uri: str) -> ScoredSet:
    index = manifest.read_index(uri) if manifest.index_uri(uri) else {"config": {}}
    frame = manifest.read_manifest(uri)
    splits = sorted(frame["split"].dropna().unique()) if len(frame) else []
    label = ", ".join(splits[:3]) + (" ..." if len(splits) > 3 else "") if splits else index.get("stage", "manifest")
    name = f"{label} [{index.get('key', uri.rstrip('/').rsplit('/', 1)[-1])}]"
    return ScoredSet(name=name, frame=frame, info={"source": uri, **index.get("config", {})})


@flow(name="report")
def report_flow(input: str, out: str, compare: list[str] | None = None, title: str = "bfr-curate quality report",
                n_extremes: int = 8) -> str:
    """Write the HTML report for a scored manifest (and others to compare); returns its URI."""
    sets = [load_scored(u) for u in [input, *(compare or [])]]
    uri = write_report(render_report(sets, title=title, n_extremes=n_extremes), out)
    table = summary_table(sets)
    create_table_artifact(key="quality-summary", table=table.astype(object).where(table.notna(), None)
                          .to_dict("records"), description=f"{title}: summary per set, stage and split")
    create_markdown_artifact(key="quality-report", markdown=summary_markdown(sets) + f"\n\nReport: `{uri}`",
                             description=title)
    return uri
