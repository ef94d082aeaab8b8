"""The pseudo-targets shard task: read a shard of LQ images, sample targets in batches, write a shard."""

from __future__ import annotations

from dataclasses import asdict

import torch
from prefect import task

from bfr_models.device import autocast_dtype
from bfr_models.diffusion.lowpass import matlab_resize
from bfr_models.diffusion.prior import Prior, load_prior
from bfr_models.gate import GateConfig, judge
from bfr_models.manifest import ManifestWriter
from bfr_models.metrics.niqe import BLOCK, niqe
from bfr_models.pseudo_targets import MethodParams, PseudoTargetError, Targets, difbfsr_config, generate
from tasks.pipeline import ShardPipeline, host_batch, host_uint8
from tasks.rows import error_row, ok_row, stamp
from tasks.runtime import device_turn, load_once, resolve_device, shard_cache_key
from tasks.shards import ShardSpec, derived_seed

STAGE = "pseudo-targets"


@load_once(maxsize=2)
def cached_prior(uri: str, device: str) -> Prior:
    return load_prior(uri, device)


@load_once(maxsize=2)
def cached_restorer(spec: str, device: str):
    from bfr_models.restorers import load_restorer

    return load_restorer(spec, device)


def warm(gate_musiq: bool, gate_identity: bool, device: str) -> None:
    """Load the gate's optional scorers into this process's caches, as :func:`gate_batch` asks for them (the
    prior is loaded when the command plans; flows/warm.py)."""
    from tasks.clean import cached_scorers

    cached_scorers(gate_musiq, False, gate_identity, str(resolve_device(device)))


def niqe_defined(height: int, width: int) -> bool:
    """NIQE needs at least two 96-px blocks."""
    return (height // BLOCK) * (width // BLOCK) >= 2


def sample_seeds(seed: int, parent_id: str, best_of: int) -> list[int]:
    """One seed per sample of an image: from the run seed and the image only (batch-independent)."""
    return [derived_seed(seed, STAGE, parent_id, str(k)) for k in range(best_of)]


def run_generate(p: MethodParams, images: torch.Tensor, prior: Prior, seeds, restorer, resize: str,
                 fidelity_limit: float, dtype: str, compile: bool = False):
    """:func:`generate` with this project's best-of-k score: NIQE where it is defined."""
    out_h, out_w = images.shape[-2:] if resize == "input" else (prior.resolution, prior.resolution)
    return generate(p, images, prior, seeds, restorer=restorer, resize=resize, fidelity_limit=fidelity_limit,
                    dtype=autocast_dtype(dtype), quality_fn=niqe if niqe_defined(out_h, out_w) else None,
                    compile=compile)


def gate_batch(p: MethodParams, images: torch.Tensor, result: Targets, resolution: int, gate: GateConfig,
               musiq: bool, identity: bool, device: str) -> list[dict]:
    """The quality gate's records of a batch: each target against its input at the target's size, fidelity and
    colour on copies of ``resolution`` / N pixels (the band the method keeps at the prior's resolution), noise
    estimates as :func:`generate` measured them (at the prior's resolution). NIQE where it is defined; MUSIQ
    and FaceNet identity when the flow found their weights."""
    from tasks.clean import cached_scorers

    target = result.images
    inputs = matlab_resize(images.double(), tuple(target.shape[-2:])).float().clamp(0, 1)
    musiq_net, _, identity_fn = cached_scorers(musiq, False, identity, device)
    factor = (p.N or gate.default_N) * target.shape[-2] / resolution
    return judge(target, inputs, factor, gate,
                 noise_target=torch.tensor([r["noise_sigma"] for r in result.records]),
                 noise_input=torch.tensor([r["input_noise_sigma"] for r in result.records]),
                 niqe=niqe if niqe_defined(*target.shape[-2:]) else None,
                 musiq=musiq_net, identity=identity_fn)


@task(name="pseudo-targets-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def pseudo_target_shard(spec: ShardSpec, stage_uri: str, params: dict, prior_uri: str, restorer: str | None,
                        resize: str, best_of: int, fidelity_limit: float, seed: int, device: str, dtype: str,
                        batch_size: int, auto: dict | None, gate: dict, gate_musiq: bool = False,
                        gate_identity: bool = False, compile: bool = False) -> dict:
    dev = resolve_device(device)
    p = MethodParams(**params)
    gate_config = GateConfig(**gate)
    prior = cached_prior(prior_uri, str(dev))
    restore = cached_restorer(restorer, str(dev)) if restorer else None
    writer = ManifestWriter(stage_uri)
    knobs = {"difbfsr": difbfsr_config(p).as_dict()} if p.method == "difbfsr" else {}  # every default, recorded
    common = {**p.as_dict(), **knobs, "prior": prior.describe(), "restorer": restore.describe() if restore else None,
              "fidelity_limit": fidelity_limit, **({"auto": auto} if auto else {})}
    with ShardPipeline(STAGE, spec.items, batch_size, per_chunk=False, shard=spec.key) as shard:
        for batch in shard.batches():
            images = host_batch(batch, torch.device("cpu")).float() / 255.0
            seeds = [sample_seeds(seed, d.parent_id, best_of) for d in batch]
            try:
                with device_turn(dev):  # decode and writes go on in other threads meanwhile
                    result = run_generate(p, images, prior, seeds, restore, resize, fidelity_limit, dtype, compile)
                    gates = gate_batch(p, images, result, prior.resolution, gate_config, gate_musiq, gate_identity,
                                       str(dev))
                    targets = host_uint8(result.images)
            except PseudoTargetError as e:  # e.g. a size the user refused to resize: a row per image says so
                shard.error(batch, f"pseudo-targets: {e}")
                continue
            for d, rgb, rec, measured in zip(batch, targets, result.records, gates):
                finite, error = rec.pop("finite"), rec.pop("error")
                if error or not finite:  # this image failed, the batch goes on
                    reason = error or "the sampler produced non-finite values"
                    shard.add_row(d, error_row(STAGE, d.item, f"pseudo-targets: {reason}"))
                    continue
                lf = rec.pop("lf_psnr")
                for measured_here in ("noise_sigma", "input_noise_sigma"):  # columns via the gate's record
                    rec.pop(measured_here)
                shard.write(d, writer, rgb, lambda out, d=d, rgb=rgb, rec=rec, lf=lf, measured=measured: ok_row(
                    STAGE, d.item, d.parent_id, out, rgb, seed=rec["seed"], split=d.item.split,
                    params={**common, **rec, **d.source}, lf_psnr=lf, model_px=prior.resolution,
                    resized=rec["resize"] is not None, **measured))
        rows = shard.rows()
    return asdict(writer.write_shard(spec.key, stamp(rows, dev, dtype=dtype)))
