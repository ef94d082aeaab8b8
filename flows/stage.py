"""Running a stage: where it writes, its shards as Prefect tasks, its progress bar, its index."""

from __future__ import annotations

import json

from prefect.futures import as_completed
from tqdm.auto import tqdm

from bfr_models import manifest, storage
from bfr_models.manifest import ManifestWriter, ShardInfo
from tasks.runtime import result_storage
from tasks.shards import CODE_VERSION, InputItem, make_shards, stable_hash

INPUTS_NAME = "inputs.json"  # incremental stages: which inputs each shard holds


class StageError(RuntimeError):
    """A stage that could not finish: some shard tasks failed."""


def stage_location(out: str, stage: str, config: dict, input_uri: str) -> tuple[str, str]:
    """The stage's key and folder: the same inputs and config always land in the same place."""
    key = stable_hash([stage, config, storage.normalize(input_uri)], length=12)
    return key, storage.join(storage.normalize(out), stage, key)


def _item_id(item: InputItem) -> str:
    return stable_hash([item.uri, item.version, item.parent_id, item.reference])


def reusable_shards(stage_uri: str, items: list[InputItem]) -> tuple[list[ShardInfo], list[InputItem], dict]:
    """Shards of an earlier run of this stage whose inputs are all still there, unchanged, with the same code.

    Returns (kept shards, the items no kept shard holds, kept shard name -> item ids). Images added to a
    scheduled dataset then go to new shards only; everything already done is neither recomputed nor
    re-sharded (content-defined shard boundaries alone would re-run every shard a new image lands in).
    """
    uri = storage.join(stage_uri, INPUTS_NAME)
    if not storage.exists(uri) or not manifest.index_uri(stage_uri):
        return [], items, {}
    try:
        recorded = json.loads(storage.read_bytes(uri))
        index = manifest.read_index(stage_uri, check_shards=False)  # each shard is checked below
    except ValueError:  # a corrupt inputs.json or index (ManifestError): nothing to reuse, this run rewrites both
        return [], items, {}
    if not isinstance(recorded, dict) or recorded.get("code") != CODE_VERSION or not isinstance(
            recorded.get("shards"), dict):
        return [], items, {}
    ids = {_item_id(i): i for i in items}
    images = manifest.image_names(stage_uri)
    kept, held = [], {}
    for shard in index["shards"]:
        members = recorded["shards"].get(shard["name"])
        # a damaged shard (missing, other bytes, missing images) is not kept: its items are processed again
        if members and all(m in ids for m in members) and not manifest.shard_files_problem(stage_uri, shard, images):
            kept.append(ShardInfo(**shard))
            held[shard["name"]] = members
    done = {m for members in held.values() for m in members}
    return kept, [i for i in items if _item_id(i) not in done], held


def run_stage(shard_task, stage: str, config: dict, items: list[InputItem], input_uri: str, out: str,
              shard_size: int, incremental: bool = False, **task_kwargs) -> str:
    """Run one task per shard (cached), then write the index. Returns the manifest URI.

    ``incremental``: keep the shards of the previous run in this stage folder whose inputs are unchanged
    and process only the other items (see :func:`reusable_shards`).
    """
    key, stage_uri = stage_location(out, stage, config, input_uri)
    kept, todo, held = reusable_shards(stage_uri, items) if incremental else ([], items, {})
    specs = make_shards(stage, {**config, "code": CODE_VERSION}, todo, shard_size)
    # JSON results, so a cached record can be checked before it is used (tasks.runtime.shard_cache_key)
    configured = shard_task.with_options(result_storage=result_storage(stage_uri), result_serializer="json")
    futures = {configured.submit(spec=spec, stage_uri=stage_uri, **task_kwargs): spec for spec in specs}
    shards, failures = list(kept), []
    with tqdm(total=len(todo), desc=stage, unit="img", dynamic_ncols=True) as bar:
        for future in as_completed(list(futures)):
            spec = futures[future]
            try:
                shards.append(ShardInfo(**future.result()))
            except Exception as e:  # report every failed shard, not just the first
                failures.append(f"shard {spec.key}: {type(e).__name__}: {e}")
            bar.update(len(spec.items))
    if failures:
        raise StageError(f"{len(failures)} of {len(specs)} shards failed; rerun to resume. First: {failures[0]}")
    if incremental:
        held.update({s.key: [_item_id(i) for i in s.items] for s in specs})
        storage.write_bytes_atomic(storage.join(stage_uri, INPUTS_NAME),
                                   json.dumps({"code": CODE_VERSION, "shards": held}).encode())
    ManifestWriter(stage_uri).write_index(stage, key, config, shards, input=storage.normalize(input_uri))
    return stage_uri


def skipped_record(input_uri: str, skipped: int, exclude) -> dict:
    """What a stage's index records about a folder input's files that got no row (dotfiles, ``exclude``
    matches); beside the config, never part of the stage key."""
    if manifest.is_manifest(input_uri):
        return {}
    return {"skipped_inputs": skipped, "exclude": list(exclude)}


def annotate_index(uri: str, **info) -> None:
    """Add set-level results (FID, conventions, what was not computed, rounds) to a stage's index."""
    index = manifest.read_index(uri)
    index["config"].update(info)
    storage.write_bytes_atomic(storage.join(uri, manifest.INDEX_NAME),
                               json.dumps(index, indent=1, sort_keys=True, default=str).encode())
