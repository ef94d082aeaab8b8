"""Running a stage: where it writes, its shards as Prefect tasks, its progress bar, its index."""

from __future__ import annotations

from prefect.futures import as_completed
from tqdm.auto import tqdm

from bfr_models import storage
from bfr_models.manifest import ManifestWriter, ShardInfo
from tasks.runtime import result_storage
from tasks.shards import CODE_VERSION, InputItem, make_shards, stable_hash


class StageError(RuntimeError):
    """A stage that could not finish: some shard tasks failed."""


def stage_location(out: str, stage: str, config: dict, input_uri: str) -> tuple[str, str]:
    """The stage's key and folder: the same inputs and config always land in the same place."""
    key = stable_hash([stage, config, storage.normalize(input_uri)], length=12)
    return key, storage.join(storage.normalize(out), stage, key)


def run_stage(shard_task, stage: str, config: dict, items: list[InputItem], input_uri: str, out: str,
              shard_size: int, **task_kwargs) -> str:
    """Run one task per shard (cached), then write the index. Returns the manifest URI."""
    key, stage_uri = stage_location(out, stage, config, input_uri)
    specs = make_shards(stage, {**config, "code": CODE_VERSION}, items, shard_size)
    configured = shard_task.with_options(result_storage=result_storage(stage_uri))
    futures = {configured.submit(spec=spec, stage_uri=stage_uri, **task_kwargs): spec for spec in specs}
    shards, failures = [], []
    with tqdm(total=len(items), desc=stage, unit="img", dynamic_ncols=True) as bar:
        for future in as_completed(list(futures)):
            spec = futures[future]
            try:
                shards.append(ShardInfo(**future.result()))
            except Exception as e:  # report every failed shard, not just the first
                failures.append(f"shard {spec.key}: {type(e).__name__}: {e}")
            bar.update(len(spec.items))
    if failures:
        raise StageError(f"{len(failures)} of {len(specs)} shards failed; rerun to resume. First: {failures[0]}")
    ManifestWriter(stage_uri).write_index(stage, key, config, shards)
    return stage_uri
