"""What a stage run shows in Prefect's UI: a run name saying stage and input, tags, a summary table artifact.

Every stage flow takes ``flow_run_name=run_name``; commands and the recipe call stage flows through
:func:`call_flow` (tags: ``stage:<name>``, ``preset:<preset>``, ``method:<method>``); every stage that
writes an index publishes :func:`publish_stage_summary` under a key unique to its stage and key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from bfr_models import manifest

if TYPE_CHECKING:  # pandas costs ~0.35 s to import: not before a stage's first image
    import pandas as pd

TAGGED_PARAMETERS = ("preset", "method")  # besides the stage: what a run is filtered by in the UI
NAMED_PARAMETERS = ("preset", "split", "scale", "method", "metrics", "restorer")  # shown in the run name


def artifact_key(*parts) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", "-".join(str(p) for p in parts).lower())).strip("-")


def short_uri(uri: str) -> str:
    """The last two parts of a path or URL (``degrade/3f2a...``, ``photos/faces``): enough to recognise it."""
    return "/".join(str(uri).rstrip("/").replace("\\", "/").split("/")[-2:])


def run_name() -> str:
    """The flow-run name of the running flow: stage, input and its main settings, e.g.
    ``degrade faces/raw (preset dr2, split medium)``. Used as ``@flow(flow_run_name=run_name)``."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    params = context.parameters or {}
    recipe = params.get("recipe")
    source = params.get("input") or params.get("pairs") or (recipe.get("name") if isinstance(recipe, dict) else None)
    settings = ", ".join(f"{k} {params[k]:g}" if isinstance(params[k], float) else f"{k} {params[k]}"
                         for k in NAMED_PARAMETERS if params.get(k) not in (None, ""))
    return " ".join(p for p in (context.flow.name, short_uri(source) if source else "",
                                f"({settings})" if settings else "") if p)


def run_tags(stage: str, params: dict) -> list[str]:
    return [f"stage:{stage}"] + [f"{k}:{params[k]}" for k in TAGGED_PARAMETERS if params.get(k)]


def call_flow(flow_fn, **params):
    """Call a stage flow with its tags (stage, preset, method) on its run (not on its shard task runs:
    :func:`flows.stage.untagged`)."""
    from prefect import tags

    with tags(*run_tags(flow_fn.name, params)):
        return flow_fn(**params)


def summary_rows(df: pd.DataFrame) -> list[dict]:
    """Per split (and all): rows, ok, error, gate passes where targets are gated, images replaced where a set
    was cleaned, mean of every metric."""
    import pandas as pd

    from bfr_models.report import metric_columns

    metrics = metric_columns(df)
    split = df["split"].fillna("-") if "split" in df and len(df) else pd.Series("-", index=df.index)
    groups = [(s, g) for s, g in df.groupby(split, sort=True)] if len(df) else []
    if len(groups) != 1:
        groups.append(("all", df))
    rows = []
    for name, g in groups:
        ok = g[g["status"] == "ok"] if len(g) else g
        row = {"split": name, "rows": len(g), "ok": len(ok), "error": len(g) - len(ok)}
        if "gate" in g:
            row["gate_pass"] = int((g["gate"] == "pass").sum())
        if "replaced" in g:
            row["replaced"] = int(ok["replaced"].fillna(False).astype(bool).sum())
        for m in metrics:
            values = pd.to_numeric(ok[m], errors="coerce").dropna()
            row[f"mean_{m}"] = round(float(values.mean()), 4) if len(values) else None
        rows.append(row)
    return rows


def key_figures(config: dict) -> list[str]:
    """Set-level figures a stage records in its index, one short line each."""
    lines = []
    for name, record in sorted((config.get("set_metrics") or {}).items()):
        lines.append(f"{name}: {record.get('value') if isinstance(record, dict) else record}")
    for r in config.get("rounds") or []:
        lines.append(f"round {r.get('round')}: {r.get('replaced')} of {r.get('images')} images replaced")
    for name, value in sorted((config.get("final_validation") or {}).items()):
        lines.append(f"validation {name}: {value:.4g}" if isinstance(value, float) else f"validation {name}: {value}")
    auto = config.get("auto")
    if isinstance(auto, dict) and auto.get("chosen") is not None and auto.get("grid"):
        lines.append(f"auto chose: {auto['grid'][auto['chosen']]}")
    for r in config.get("not_computed") or []:
        lines.append(f"not computed: {r.get('metric')} (needs {r.get('needs')})")
    if config.get("skipped_inputs"):
        lines.append(f"skipped input files: {config['skipped_inputs']}")
    return lines


def publish_stage_summary(stage_uri: str) -> str:
    """Publish a stage run's summary table artifact (key ``<stage>-<key>``); returns the key."""
    from prefect.artifacts import create_table_artifact

    index = manifest.read_index(stage_uri)
    key = artifact_key(index["stage"], index["key"])
    lines = [f"**{index['stage']}** of `{index.get('input', '-')}` -> `{stage_uri}`", *key_figures(index["config"])]
    create_table_artifact(key=key, table=summary_rows(manifest.read_manifest(stage_uri)),
                          description="\n\n".join(lines))
    return key


def publish_model_summary(stage: str, uri: str, settings: dict) -> str:
    """Publish a training stage's artifact (key ``<stage>-<folder name>``): its model folder and settings."""
    from prefect.artifacts import create_table_artifact

    name = artifact_key(stage, uri.rstrip("/").rsplit("/", 1)[-1])
    table = [{"setting": k, "value": str(v)} for k, v in sorted(settings.items())]
    create_table_artifact(key=name, table=[{"setting": "model", "value": uri}, *table],
                          description=f"**{stage}** -> `{uri}`")
    return name
