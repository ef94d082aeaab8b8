"""The report: one self-contained HTML file, and the same summary as Prefect artifacts."""

from __future__ import annotations

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bfr_models import manifest, storage
from bfr_models.report import ScoredSet, Thumbnails, build_report, search_section, summary_markdown, summary_table
from bfr_models.report.load import load_scored
from bfr_models.report.page import MAX_STRIP, files_dir_for, write_report
from flows.run_info import artifact_key, run_name
from tasks.shards import stable_hash


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


def stage_sections(sets: list[ScoredSet], n: int, thumbs: Thumbnails) -> list:
    """A section for each fine-tuning, cleaning or pseudo-target (quality gate) run among the sets (or among
    what they scored)."""
    import io

    from bfr_models.report_stages import clean_section, finetune_section, gate_section

    done, out = set(), []
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
                n_extremes: int = 8, labels: dict[str, str] | None = None) -> str:
    """Write the HTML report for a scored manifest (and others to compare); returns its URI. ``labels``: a name
    for a manifest (its URI as given) instead of its splits and stage key."""
    labels = {storage.normalize(k): v for k, v in (labels or {}).items()}
    sets = [load_scored(u, labels.get(storage.normalize(u))) for u in [input, *(compare or [])]]
    searches = auto_searches(sets)
    thumbs = Thumbnails()
    extra = ([search_section(searches)] if searches else []) + stage_sections(sets, min(n_extremes, MAX_STRIP), thumbs)
    report = build_report(sets, title=title, n_extremes=n_extremes, extra_sections=extra, thumbs=thumbs,
                          files_dir=files_dir_for(out))
    uri = write_report(report, out)
    table = summary_table(sets)
    # one pair of cards per report input (its stage key), not two cards all reports overwrite
    set_key = manifest.read_index(input)["key"] if manifest.index_uri(input) else stable_hash([storage.normalize(input)])
    create_table_artifact(key=artifact_key("quality-summary", set_key),
                          table=table.astype(object).where(table.notna(), None).to_dict("records"),
                          description=f"{title}: summary per set, stage and split")
    create_markdown_artifact(key=artifact_key("quality-report", set_key),
                             markdown=summary_markdown(sets) + f"\n\nReport: `{uri}`", description=title)
    return uri
