"""The clean shard task (IDM Eq. 10 + acceptance): x* = f(x) for a shard of HQ images, judged per image.

Each row is the image the cleaned dataset holds: x* when accepted, else the original x (its own URI,
no copy). The candidate x* is always written (``candidate_uri``) so reports can show what was rejected.
:func:`set_calibration` scores the originals once for the set-level parts of the rules (which images
are "degraded", the calibrated identity threshold).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task

from bfr_models import storage
from bfr_models.degradations.ops import jpeg
from bfr_models.device import autocast_dtype, generators, split_on_lanes
from bfr_models.idm import AcceptanceConfig, IDMModel, SetCalibration, calibrate, idm_sample, judge, load_idm
from bfr_models.metrics.fid import FEATURE_DIM, shard_features_uri, write_shard_features
from bfr_models.manifest import ManifestWriter
from bfr_models.resize import at_resolution, is_resized
from bfr_models.metrics.niqe import niqe
from tasks.pipeline import ShardPipeline, host_batch, host_uint8
from tasks.pseudo_targets import niqe_defined
from tasks.rows import Written, decode_items, ok_row, same_size_batches, stamp
from tasks.runtime import device_turn, load_once, resolve_device, shard_cache_key
from tasks.score import extractor
from tasks.shards import ShardSpec, derived_seed, read_many

STAGE = "clean"
FID_CONVENTION = "clean"  # clean-fid's: the FID of the cleaned dataset against the originals
FID_SETS = ("cleaned", "original")


@load_once(maxsize=2)
def cached_idm(uri: str, device: str) -> IDMModel:
    return load_idm(uri, device)


@load_once(maxsize=6)
def cached_scorer(name: str, device: str):
    """One optional scorer, ``musiq``, ``lpips`` or ``identity``, built once per process and device: the set
    calibration and the shards ask for different sets of scorers and share each one."""
    from bfr_models.metrics.identity import FaceIdentity
    from bfr_models.metrics.lpips_metric import LPIPS
    from bfr_models.metrics.musiq import MUSIQ

    build = {"musiq": lambda: MUSIQ(device=device), "lpips": lambda: LPIPS("vgg", device=device),
             "identity": lambda: FaceIdentity(device=device)}
    return build[name]()


def cached_scorers(musiq: bool, lpips: bool, identity: bool, device: str) -> tuple:
    """(MUSIQ, LPIPS, FaceNet identity) from :func:`cached_scorer`; None where the flow found no weights."""
    wanted = {"musiq": musiq, "lpips": lpips, "identity": identity}
    return tuple(cached_scorer(name, device) if on else None for name, on in wanted.items())


def warm(model_uri: str, device: str, musiq: bool, lpips: bool, identity: bool, fid: bool) -> None:
    """Load what a shard of the first round needs into this process's caches (flows/warm.py)."""
    dev = str(resolve_device(device))
    cached_idm(model_uri, dev)
    cached_scorers(musiq, lpips, identity, dev)
    if fid:
        extractor(FID_CONVENTION, dev)


def _batch_tensor(batch, dev) -> torch.Tensor:
    return torch.from_numpy(np.stack([rgb for _, _, rgb, _ in batch])).permute(0, 3, 1, 2).float().to(dev) / 255.0


def set_calibration(items: list, config: AcceptanceConfig, musiq: bool, identity: bool, device: str,
                    batch_size: int, chunk: int = 256) -> SetCalibration:
    """Score every original once: MUSIQ (NIQE without MUSIQ) ranks the set for A4's "degraded" cut; with
    FaceNet and no fixed ``min_identity``, cosine(x, JPEG_q(x)) gives A1's threshold (spec §9.4)."""
    dev = resolve_device(device)
    calibrate_identity = identity and config.min_identity is None
    musiq_fn, _, identity_fn = cached_scorers(musiq, False, calibrate_identity, str(dev))
    quality, cosines = [], []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        decoded, _ = decode_items(STAGE, part, read_many([i.uri for i in part]))  # unreadable: error rows later
        for batch in same_size_batches(decoded, batch_size):
            x = _batch_tensor(batch, dev)
            if musiq_fn is not None:
                quality += musiq_fn(x).tolist()
            elif niqe_defined(*x.shape[-2:]):
                quality += niqe(x).tolist()
            if identity_fn is not None:
                mild = jpeg(x, [config.identity_jpeg_quality] * len(x)).to(dev)
                cosines += identity_fn(mild, x).tolist()
    return calibrate(config, "musiq" if musiq_fn is not None else "niqe", quality, cosines)


def clean_batch(model: IDMModel, images: torch.Tensor, seeds: list[int], steps: int, variance: str, passes: int,
                dtype: str = "fp32", compile: bool = False) -> torch.Tensor:
    """x* = f(...f(x)) (``passes`` times, Eq. 3) for a (B, 3, H, W) batch in [0, 1], at the model's training
    resolution (another size is resized in and back, :func:`at_resolution`); padded to the network's multiple
    (replicate) and cropped back."""

    def sample(images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        h, w = images.shape[-2:]
        m = model.config.multiple
        x = F.pad(images, (0, (-w) % m, 0, (-h) % m), mode="replicate") * 2 - 1
        call = model.x0_model(autocast_dtype(dtype), compile)
        schedule = model.config.schedule()
        for k in range(passes):
            gens = generators([derived_seed(s, str(k)) for s in seeds], images.device)
            x = idm_sample(call, x, schedule, gens, steps=steps, variance=variance)
        return ((x[..., :h, :w] + 1) / 2).clamp(0, 1)

    return torch.cat(split_on_lanes(lambda part: at_resolution(lambda x: sample(x, seeds[part]), images[part],
                                                               model.resolution), images.shape[0], images.device))


@task(name="clean-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def clean_shard(spec: ShardSpec, stage_uri: str, model_uri: str, round: int, steps: int, variance: str, passes: int,
                acceptance: dict, calibration: dict, musiq: bool, lpips: bool, identity: bool, seed: int, device: str,
                dtype: str, batch_size: int, compile: bool = False, fid: bool = False) -> dict:
    """With ``fid``, also the FID features of the cleaned dataset's images and of the originals, one file each
    (:func:`fid_features_uri`), from the images decoded here; the flow sums them for its FID."""
    dev = resolve_device(device)
    inception = extractor(FID_CONVENTION, str(dev)) if fid else None
    features: dict[str, tuple] = {}  # source URI -> FID features of (its cleaned image, the original)
    model = cached_idm(model_uri, str(dev))
    musiq_fn, lpips_fn, identity_fn = cached_scorers(musiq, lpips, identity, str(dev))
    accept, cal = AcceptanceConfig(**acceptance), SetCalibration(**calibration)
    writer = ManifestWriter(stage_uri)
    common = {"model": model.describe(), "round": round, "steps": steps, "variance": variance, "passes": passes,
              "acceptance": acceptance, "calibration": calibration, "seed": seed}
    with ShardPipeline(STAGE, spec.items, batch_size, per_chunk=False, shard=spec.key) as shard:
        for batch in shard.batches():
            seeds = [derived_seed(seed, STAGE, str(round), d.parent_id) for d in batch]
            with device_turn(dev):  # decode and writes go on in other threads meanwhile
                x = host_batch(batch, dev).float() / 255.0
                x_star = clean_batch(model, x, seeds, steps, variance, passes, dtype, compile)
                h, w = x.shape[-2:]
                records = judge(x, x_star, accept, cal, niqe=niqe if niqe_defined(h, w) else None, musiq=musiq_fn,
                                lpips=lpips_fn, identity=identity_fn)
                rgbs_star = host_uint8(x_star)
            resized = is_resized((h, w), model.resolution)
            accepted = [rec["accepted"] for rec in records]  # read before the writes (their rows pop it)
            for d, rgb_star, rec, s in zip(batch, rgbs_star, records, seeds):
                shard.write(d, writer, rgb_star, lambda out, d=d, rgb_star=rgb_star, rec=rec, s=s: _clean_row(
                    d, out, rgb_star, rec, split=d.item.split, seed=s, params=common, round=round,
                    model_px=model.resolution, resized=resized))
            if inception is not None:  # the cleaned dataset's image (x* or x) and the original, per source file
                kept = [rgb_star if ok else d.rgb for d, rgb_star, ok in zip(batch, rgbs_star, accepted)]
                with device_turn(dev):
                    pairs = zip(inception(kept), inception([d.rgb for d in batch]))
                features.update({d.item.uri: pair for d, pair in zip(batch, pairs)})
        rows = shard.rows()
    if inception is not None:
        ok = [r for r in rows if r["status"] == "ok"]
        for k, (name, key) in enumerate((("cleaned", "sha256"), ("original", "source_sha256"))):
            vectors = [features[r["source_uri"]][k] for r in ok]
            write_shard_features(fid_features_uri(stage_uri, spec.key, name), inception.fingerprint,
                                 [r[key] for r in ok], np.stack(vectors) if vectors else np.zeros((0, FEATURE_DIM)))
    return asdict(writer.write_shard(spec.key, stamp(rows, dev, dtype=dtype)))


def fid_features_uri(stage_uri: str, shard: str, name: str) -> str:
    """A clean shard's FID features of one of :data:`FID_SETS`."""
    return shard_features_uri(stage_uri, f"{shard}.{name}")


def _clean_row(d, candidate: Written, rgb_star, rec: dict, **fields) -> dict:
    """The cleaned dataset's row: the candidate x* when accepted, else the original image (its own URI, no
    copy), with the reasons."""
    source = Written(d.item.uri, storage.sha256_hex(d.data))
    fields.update(replaced=rec.pop("accepted"), reasons=rec.pop("reasons"), candidate_uri=candidate.uri,
                  source_uri=source.uri, source_sha256=source.sha256, **rec)
    if fields["replaced"]:
        return ok_row(STAGE, d.item, d.parent_id, candidate, rgb_star, **fields)
    return ok_row(STAGE, d.item, d.parent_id, source, d.rgb, **fields)
