"""Scored manifests as report sets: their rows, index config, a name, and the rows they descend from."""

from __future__ import annotations

import pandas as pd

from bfr_models import manifest
from bfr_models.report.base import ScoredSet

LINEAGE_DEPTH = 4  # manifests read up the chain of stage inputs for the lineage strips
LINEAGE_COLUMNS = ["image_id", "uri", "stage", "parent_id", "parent_uri"]


def load_scored(uri: str, label: str | None = None) -> ScoredSet:
    """A manifest as a report set, named ``label`` or after its splits and stage key, with its lineage."""
    index = manifest.read_index(uri) if manifest.index_uri(uri) else {"config": {}}
    frame = manifest.read_manifest(uri)
    splits = sorted(frame["split"].dropna().unique()) if len(frame) else []
    if label is None:  # e.g. "pseudo-targets dr2/medium [2848b1149145]": the stage that made the rows, splits, key
        stages = sorted(frame["stage"].dropna().unique()) if len(frame) and "stage" in frame else []
        text = ", ".join(splits[:3]) + (" ..." if len(splits) > 3 else "") if splits else index.get("stage", "manifest")
        text = f"{stages[0]} {text}" if len(stages) == 1 and stages[0] not in text else text
        label = f"{text} [{index.get('key', uri.rstrip('/').rsplit('/', 1)[-1])}]"
    return ScoredSet(name=label, frame=frame, info={"source": uri, **index.get("config", {}), "manifest": uri},
                     lineage=lineage_rows(index))


def lineage_rows(index: dict) -> pd.DataFrame | None:
    """The rows (``LINEAGE_COLUMNS``, indexed by image_id) of the manifests a manifest descends from: the
    stage a score run scored, that stage's input, and so on (up to ``LINEAGE_DEPTH`` manifests)."""
    frames, up = [], index.get("input") or (index.get("config") or {}).get("source")
    for _ in range(LINEAGE_DEPTH):
        if not isinstance(up, str) or not manifest.index_uri(up):
            break
        frames.append(manifest.read_manifest(up).reindex(columns=LINEAGE_COLUMNS))
        up = manifest.read_index(up).get("input")
    if not frames:
        return None
    rows = pd.concat(frames, ignore_index=True)
    return rows.dropna(subset=["image_id", "uri"]).drop_duplicates("image_id").set_index("image_id")
