"""The report: one self-contained HTML file, and the same summary as Prefect artifacts."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bfr_models import manifest, storage
from bfr_models.report import (ScoredSet, render_report, search_section, summary_markdown, summary_table,
                               write_report)
from flows.run_info import artifact_key, run_name
from tasks.shards import stable_hash


def load_scored(uri: str) -> ScoredSet:
    index = manifest.read_index(uri) if manifest.index_uri(uri) else {"config": {}}
    frame = manifest.read_manifest(uri)
    splits = sorted(frame["split"].dropna().unique()) if len(frame) else []
    label = ", ".join(splits[:3]) + (" ..." if len(splits) > 3 else "") if splits else index.get("stage", "manifest")
    name = f"{label} [{index.get('key', uri.rstrip('/').rsplit('/', 1)[-1])}]"
    return ScoredSet(name=name, frame=frame, info={"source": uri, **index.get("config", {}), "manifest": uri})


def auto_searches(sets: list[ScoredSet]) -> list[tuple[str, dict]]:
    """The --auto records of the pseudo-target stages whose images these sets hold (from their index)."""
    found = {}
    for s in sets:
        for folder in pseudo_target_folders(s):
            if folder not in found and manifest.index_uri(folder):
                auto = manifest.read_index(folder)["config"].get("auto")
                if auto:
                    found[folder] = auto
    return sorted(found.items())


def pseudo_target_folders(s: ScoredSet) -> list[str]:
    """The pseudo-target stage folders whose images a set holds (scored sets point at them by URI)."""
    uris = s.frame["uri"].dropna() if "uri" in s.frame else []
    return sorted({u.rsplit("/images/", 1)[0] for u in uris if "/pseudo-targets/" in u and "/images/" in u})


def stage_sections(sets: list[ScoredSet], n: int) -> list:
    """A section for each fine-tuning, cleaning or pseudo-target (quality gate) run among the sets (or among
    what they scored)."""
    import io

    import pandas as pd

    from bfr_models.report import Thumbnails
    from bfr_models.report_stages import clean_section, finetune_section, gate_section

    done, out, thumbs = set(), [], Thumbnails()
    for s in sets:
        for uri in (s.info.get("manifest"), s.info.get("source"), *pseudo_target_folders(s)):
            if not uri or uri in done or not manifest.index_uri(uri):
                continue
            done.add(uri)
            index = manifest.read_index(uri)
            name = f"{index['stage']} [{index['key']}]"
            if index["stage"] == "finetune":
                log = pd.read_parquet(io.BytesIO(storage.read_bytes(index["config"]["log_uri"])))
                out.append(finetune_section(name, log, index["config"]))
            elif index["stage"] == "clean":
                out.append(clean_section(name, manifest.read_manifest(uri), index["config"], thumbs, n))
            elif index["stage"] == "pseudo-targets":
                out.append(gate_section(name, manifest.read_manifest(uri), index["config"], thumbs, n))
    return out


@flow(name="report", flow_run_name=run_name)
def report_flow(input: str, out: str, compare: list[str] | None = None, title: str = "bfr-curate quality report",
                n_extremes: int = 8) -> str:
    """Write the HTML report for a scored manifest (and others to compare); returns its URI."""
    sets = [load_scored(u) for u in [input, *(compare or [])]]
    searches = auto_searches(sets)
    extra = ([search_section(searches)] if searches else []) + stage_sections(sets, n_extremes)
    uri = write_report(render_report(sets, title=title, n_extremes=n_extremes,
                                     extra_sections=[(x.heading, x.html) for x in extra]), out)
    table = summary_table(sets)
    # one pair of cards per report input (its stage key), not two cards all reports overwrite
    set_key = manifest.read_index(input)["key"] if manifest.index_uri(input) else stable_hash([storage.normalize(input)])
    create_table_artifact(key=artifact_key("quality-summary", set_key),
                          table=table.astype(object).where(table.notna(), None).to_dict("records"),
                          description=f"{title}: summary per set, stage and split")
    create_markdown_artifact(key=artifact_key("quality-report", set_key),
                             markdown=summary_markdown(sets) + f"\n\nReport: `{uri}`", description=title)
    return uri
