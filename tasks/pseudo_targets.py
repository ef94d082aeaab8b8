"""The pseudo-targets shard task: read a shard of LQ images, sample targets in batches, write a shard."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from prefect import task

from bfr_models.diffusion.prior import Prior, load_prior
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter
from bfr_models.metrics.niqe import BLOCK, niqe
from bfr_models.pseudo_targets import MethodParams, PseudoTargetError, difbfsr_config, generate
from tasks.rows import decode_items, error_row, ok_row, same_size_batches, to_uint8, write_output
from tasks.runtime import device_slot, load_once, resolve_device, shard_cache_key
from tasks.shards import ShardSpec, derived_seed, read_many

STAGE = "pseudo-targets"
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@load_once(maxsize=2)
def cached_prior(uri: str, device: str) -> Prior:
    return load_prior(uri, device)


@load_once(maxsize=2)
def cached_restorer(spec: str, device: str):
    from bfr_models.restorers import load_restorer

    return load_restorer(spec, device)


def niqe_defined(height: int, width: int) -> bool:
    """NIQE needs at least two 96-px blocks."""
    return (height // BLOCK) * (width // BLOCK) >= 2


def sample_seeds(seed: int, parent_id: str, best_of: int) -> list[int]:
    """One seed per sample of an image: from the run seed and the image only (batch-independent)."""
    return [derived_seed(seed, STAGE, parent_id, str(k)) for k in range(best_of)]


def run_generate(p: MethodParams, images: torch.Tensor, prior: Prior, seeds, restorer, resize: str,
                 fidelity_limit: float, dtype: str):
    """:func:`generate` with this project's best-of-k score: NIQE where it is defined."""
    out_h, out_w = images.shape[-2:] if resize == "input" else (prior.resolution, prior.resolution)
    return generate(p, images, prior, seeds, restorer=restorer, resize=resize, fidelity_limit=fidelity_limit,
                    dtype=DTYPES[dtype], quality_fn=niqe if niqe_defined(out_h, out_w) else None)


@task(name="pseudo-targets-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def pseudo_target_shard(spec: ShardSpec, stage_uri: str, params: dict, prior_uri: str, restorer: str | None,
                        resize: str, best_of: int, fidelity_limit: float, seed: int, device: str, dtype: str,
                        batch_size: int, auto: dict | None) -> dict:
    dev = resolve_device(device)
    p = MethodParams(**params)
    prior = cached_prior(prior_uri, str(dev))
    restore = cached_restorer(restorer, str(dev)) if restorer else None
    writer = ManifestWriter(stage_uri)
    decoded, rows = decode_items(STAGE, spec.items, read_many([i.uri for i in spec.items]))
    knobs = {"difbfsr": difbfsr_config(p).as_dict()} if p.method == "difbfsr" else {}  # every default, recorded
    common = {**p.as_dict(), **knobs, "prior": prior.describe(), "restorer": restore.describe() if restore else None,
              "fidelity_limit": fidelity_limit, **({"auto": auto} if auto else {})}
    for batch in same_size_batches(decoded, batch_size):
        images = torch.from_numpy(np.stack([rgb for _, _, rgb, _ in batch])).permute(0, 3, 1, 2).float() / 255.0
        seeds = [sample_seeds(seed, parent_id, best_of) for _, parent_id, _, _ in batch]
        try:
            with device_slot(dev):
                result = run_generate(p, images, prior, seeds, restore, resize, fidelity_limit, dtype)
        except PseudoTargetError as e:  # e.g. a size the user refused to resize: a row per image says so
            rows += [error_row(STAGE, item, f"pseudo-targets: {e}") for item, _, _, _ in batch]
            continue
        for (item, parent_id, _, source), out, rec in zip(batch, result.images, result.records):
            finite, error = rec.pop("finite"), rec.pop("error")
            if error or not finite:  # this image failed, the batch goes on
                rows.append(error_row(STAGE, item, f"pseudo-targets: {error or 'the sampler produced non-finite values'}"))
                continue
            rgb = to_uint8(out)
            png = encode_png(rgb)
            uri = write_output(writer, png, parent_id)
            lf, nz = rec.pop("lf_psnr"), rec.pop("noise_sigma")
            rows.append(ok_row(STAGE, item, parent_id, uri, png, rgb, seed=rec["seed"], split=item.split,
                               params={**common, **rec, **source}, lf_psnr=lf, noise_sigma=nz))
    return asdict(writer.write_shard(spec.key, rows))
