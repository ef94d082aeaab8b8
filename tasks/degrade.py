"""The degrade shard task: read a shard of images, degrade them in batches, write a shard."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from prefect import task

from bfr_models.degradations import load_preset
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter
from tasks.rows import decoded_batches, error_row, ok_row, stamp, to_uint8, write_output
from tasks.runtime import device_slot, resolve_device, shard_cache_key
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
    rows = []
    label = degradation.name if split is None else f"{degradation.name}/{split}"
    with device_slot(dev):  # once per shard (one API round trip), not per batch
        for batch in decoded_batches(STAGE, spec.items, batch_size, rows):
            seeds = [degradation_seed(seed, degradation.name, split, scale, parent_id) for _, parent_id, _, _ in batch]
            params = [degradation.sample(s) for s in seeds]
            images = torch.from_numpy(np.stack([rgb for _, _, rgb, _ in batch])).permute(0, 3, 1, 2)
            try:
                outs = degradation.apply(images.to(dev, torch.float32) / 255.0, params)
            except Exception as e:  # a bad batch becomes error rows, the run goes on
                rows += [error_row(STAGE, item, f"degradation failed: {e}") for item, _, _, _ in batch]
                continue
            for (item, parent_id, _, source), p, s, out in zip(batch, params, seeds, outs):
                rgb = to_uint8(out)
                png = encode_png(rgb)
                uri = write_output(writer, png, parent_id)
                case = f"/case{p['case']}" if "case" in p else ""  # presets with cases: one group per case
                rows.append(ok_row(STAGE, item, parent_id, uri, png, rgb, params={**p, **source},
                                   seed=s, split=label + case))
    return asdict(writer.write_shard(spec.key, stamp(rows, dev)))
