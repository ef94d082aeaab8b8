"""The restore shard task: run a restorer over a shard of images, batched."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from prefect import task

from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter
from bfr_models.resize import is_resized
from tasks.pseudo_targets import cached_restorer
from tasks.rows import decode_items, ok_row, same_size_batches, stamp, to_uint8, write_output
from tasks.runtime import device_slot, resolve_device, shard_cache_key
from tasks.shards import ShardSpec, read_many

STAGE = "restore"


@task(name="restore-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def restore_shard(spec: ShardSpec, stage_uri: str, restorer: str, device: str, batch_size: int) -> dict:
    dev = resolve_device(device)
    model = cached_restorer(restorer, str(dev))
    writer = ManifestWriter(stage_uri)
    decoded, rows = decode_items(STAGE, spec.items, read_many([i.uri for i in spec.items]))
    params = {"restorer": model.describe()}
    with device_slot(dev):  # once per shard (one API round trip), not per batch
        for batch in same_size_batches(decoded, batch_size, shard=spec.key):
            images = torch.from_numpy(np.stack([rgb for _, _, rgb, _ in batch])).permute(0, 3, 1, 2).float() / 255.0
            restored = model(images.to(dev)).cpu()
            resized = is_resized(images.shape[-2:], model.resolution)  # applied at its training size, and back
            for (item, parent_id, _, source), out in zip(batch, restored):
                rgb = to_uint8(out)
                png = encode_png(rgb)
                rows.append(ok_row(STAGE, item, parent_id, write_output(writer, png, parent_id), png, rgb,
                                   split=item.split, params={**params, **source}, model_px=model.resolution,
                                   resized=resized))
    return asdict(writer.write_shard(spec.key, stamp(rows, dev)))
