"""The score shard task: add metric columns to a shard of manifest rows (and cache FID features)."""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import lru_cache
from itertools import groupby

import numpy as np
import torch
from prefect import task

from bfr_models import storage
from bfr_models.imageio import ImageError, decode_source
from bfr_models.manifest import ManifestWriter
from bfr_models.metrics.suite import MetricSuite, ScoreConfig
from tasks.rows import content_id
from tasks.runtime import device_slot, resolve_device, shard_cache_key
from tasks.shards import ShardSpec, read_many

STAGE = "score"


@lru_cache(maxsize=2)
def _suite(config: ScoreConfig, device: str, skip: tuple[str, ...]) -> MetricSuite:
    return MetricSuite(config, torch.device(device), skip)


def _decode(data, name: str) -> np.ndarray:
    if isinstance(data, Exception):
        raise ImageError(f"cannot read: {type(data).__name__}: {data}")
    return decode_source(data, name)[0]


def _tensor(rgbs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float() / 255.0


@task(name="score-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def score_shard(spec: ShardSpec, stage_uri: str, score_config: dict, skip: list[str], device: str, batch_size: int,
                fid_cache: str | None) -> dict:
    cfg = ScoreConfig(**{**score_config, "metrics": tuple(score_config["metrics"])})
    dev = resolve_device(device)
    suite = _suite(cfg, str(dev), tuple(skip))
    rows = [json.loads(item.row) for item in spec.items]
    todo = [(k, item) for k, item in enumerate(spec.items) if rows[k]["status"] == "ok"]
    wanted = [i.uri for _, i in todo] + [i.reference for _, i in todo if suite.needs_reference and i.reference]
    fetched = read_many(sorted(set(wanted)))
    ready = []
    for k, item in todo:
        data = fetched[item.uri]
        if rows[k]["sha256"] is None and isinstance(data, bytes):  # a folder input: identify it by content now
            rows[k].update(sha256=storage.sha256_hex(data), image_id=content_id(data, item.name))
        try:
            img = _decode(data, item.name or item.uri)
            ref = None
            if suite.needs_reference:
                if not item.reference:
                    raise ImageError("no reference image for this row")
                ref = _decode(fetched[item.reference], item.reference)
                if ref.shape != img.shape:
                    raise ImageError(f"size {img.shape[1]}x{img.shape[0]} differs from its reference "
                                     f"{ref.shape[1]}x{ref.shape[0]} ({item.reference})")
        except ImageError as e:
            rows[k].update(status="error", error=f"score: {e}")
            continue
        ready.append((k, img, ref))
    ready.sort(key=lambda r: r[1].shape)
    for _, group in groupby(ready, key=lambda r: r[1].shape):
        group = list(group)
        for start in range(0, len(group), batch_size):
            for k, scores in _score_batch(suite, dev, group[start : start + batch_size]):
                if isinstance(scores, Exception):
                    rows[k].update(status="error", error=f"score: {scores}")
                else:
                    rows[k].update(scores)
    ready = [r for r in ready if rows[r[0]]["status"] == "ok"]
    if fid_cache is not None and "fid" in cfg.metrics and "fid" not in skip:
        _cache_fid_features(cfg, dev, fid_cache, [(rows[k]["uri"], rows[k]["sha256"]) for k, _, _ in ready])
    return asdict(ManifestWriter(stage_uri).write_shard(spec.key, rows))


def _score_batch(suite: MetricSuite, dev: torch.device, batch: list) -> list[tuple[int, dict | Exception]]:
    """Scores of one batch; if the batch fails, each image alone, so one bad image is one error row."""
    refs = _tensor([r for _, _, r in batch]) if suite.needs_reference else None
    try:
        with device_slot(dev):
            scores = suite(_tensor([img for _, img, _ in batch]), refs)
    except (ValueError, RuntimeError) as e:
        if len(batch) == 1:
            return [(batch[0][0], e)]
        return [result for item in batch for result in _score_batch(suite, dev, [item])]
    return [(k, {m: float(v[j]) for m, v in scores.items()}) for j, (k, _, _) in enumerate(batch)]


@lru_cache(maxsize=2)
def _extractor(convention: str, device: str):
    from bfr_models.metrics.fid import InceptionFeatures

    return InceptionFeatures(convention=convention, device=device)


def _cache_fid_features(cfg: ScoreConfig, dev: torch.device, cache_root: str, refs: list[tuple[str, str]]) -> None:
    """Extract this shard's Inception features into the content-keyed cache the flow reads back."""
    from bfr_models.metrics.fid import FeatureCache, ImageRef, extract_features

    extractor = _extractor(cfg.fid_convention, str(dev))
    with device_slot(dev):
        extract_features([ImageRef(u, s) for u, s in refs], extractor, FeatureCache(cache_root, extractor.fingerprint))
