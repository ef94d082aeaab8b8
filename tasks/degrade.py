"""The degrade shard task: read a shard of images, degrade them in batches, write a shard."""

from __future__ import annotations

from dataclasses import asdict

import torch
from prefect import task

from bfr_models.degradations import load_preset
from bfr_models.device import split_on_lanes
from bfr_models.manifest import ManifestWriter
from tasks.pipeline import ShardPipeline, host_batch, host_uint8
from tasks.rows import ok_row, stamp
from tasks.runtime import resolve_device, shard_cache_key
from tasks.shards import ShardSpec, derived_seed

STAGE = "degrade"


def degradation_seed(seed: int, preset: str, split: str | None, scale: float | None, parent_id: str) -> int:
    """The image's seed for one split at one scale: DR2's mild/medium/severe x 4/8/16 draw their own noise
    type, position in each range and noise stream for the same image (the split and scale join the seed
    when given; presets without them keep the seed of (run seed, stage, preset, image))."""
    parts = [STAGE, preset] + ([f"split={split}"] if split is not None else []) + \
        ([f"scale={float(scale):g}"] if scale is not None else [])
    return derived_seed(seed, *parts, parent_id)


@task(name="degrade-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def degrade_shard(spec: ShardSpec, preset: str, split: str | None, scale: float | None, seed: int,
                  stage_uri: str, device: str, batch_size: int) -> dict:
    degradation = load_preset(preset, split=split, scale=scale)
    dev = resolve_device(device)
    writer = ManifestWriter(stage_uri)
    label = degradation.name if split is None else f"{degradation.name}/{split}"
    with ShardPipeline(STAGE, spec.items, batch_size, per_chunk=True, shard=spec.key) as shard:
        for batch in shard.batches():
            seeds = [degradation_seed(seed, degradation.name, split, scale, d.parent_id) for d in batch]
            params = [degradation.sample(s) for s in seeds]
            try:
                images = host_batch(batch, dev).to(torch.float32) / 255.0
                outs = [rgb for part in split_on_lanes(lambda s: host_uint8(degradation.apply(images[s], params[s])),
                                                       len(batch), dev) for rgb in part]
            except Exception as e:  # a bad batch becomes error rows, the run goes on
                shard.error(batch, f"degradation failed: {e}")
                continue
            for d, p, s, rgb in zip(batch, params, seeds, outs):
                case = f"/case{p['case']}" if "case" in p else ""  # presets with cases: one group per case
                shard.write(d, writer, rgb, lambda out, d=d, p=p, s=s, rgb=rgb, case=case: ok_row(
                    STAGE, d.item, d.parent_id, out, rgb, params={**p, **d.source}, seed=s, split=label + case))
        rows = shard.rows()
    return asdict(writer.write_shard(spec.key, stamp(rows, dev)))
