"""The restore shard task: run a restorer over a shard of images, batched."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from bfr_models.manifest import ManifestWriter
from bfr_models.resize import is_resized
from tasks.pseudo_targets import cached_restorer
from tasks.pipeline import ShardPipeline, host_batch, host_uint8
from tasks.rows import ok_row, stamp
from tasks.runtime import device_turn, resolve_device, shard_cache_key
from tasks.shards import ShardSpec

STAGE = "restore"


@task(name="restore-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def restore_shard(spec: ShardSpec, stage_uri: str, restorer: str, device: str, batch_size: int) -> dict:
    dev = resolve_device(device)
    model = cached_restorer(restorer, str(dev))
    writer = ManifestWriter(stage_uri)
    params = {"restorer": model.describe()}
    with ShardPipeline(STAGE, spec.items, batch_size, per_chunk=False, shard=spec.key) as shard:
        for batch in shard.batches():
            with device_turn(dev):  # decode and writes go on in other threads meanwhile
                restored = host_uint8(model(host_batch(batch, dev).float() / 255.0))
            resized = is_resized(batch[0].rgb.shape[:2], model.resolution)  # applied at its training size, and back
            for d, rgb in zip(batch, restored):
                shard.write(d, writer, rgb, lambda out, d=d, rgb=rgb, resized=resized: ok_row(
                    STAGE, d.item, d.parent_id, out, rgb, split=d.item.split, params={**params, **d.source},
                    model_px=model.resolution, resized=resized))
        rows = shard.rows()
    return asdict(writer.write_shard(spec.key, stamp(rows, dev)))
