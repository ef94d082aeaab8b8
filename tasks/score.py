"""The score shard task: add metric columns to a shard of manifest rows (and write its FID features)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from itertools import groupby

import numpy as np
import torch
from prefect import task

from bfr_models import storage
from bfr_models.device import lane_imap
from bfr_models.imageio import ImageError, decode_source
from bfr_models.manifest import ManifestWriter
from bfr_models.metrics.suite import MetricSuite, ScoreConfig
from tasks.pipeline import prefetched
from tasks.rows import digest_id, stamp
from tasks.runtime import load_once, report_images, resolve_device, shard_cache_key
from tasks.shards import ShardSpec, read_many

STAGE = "score"


@load_once(maxsize=2)
def _suite(config: ScoreConfig, device: str, skip: tuple[str, ...]) -> MetricSuite:
    return MetricSuite(config, torch.device(device), skip)


@load_once(maxsize=2)
def extractor(convention: str, device: str):
    """The FID Inception of a convention, loaded once per process (the flow's FID step uses it too)."""
    from bfr_models.metrics.fid import InceptionFeatures

    return InceptionFeatures(convention=convention, device=device)


def warm(score_config: dict, skip: list[str], device: str) -> None:
    """Load the networks a shard of this config needs into this process's caches (its shards then find them
    loaded): what the command does while Prefect starts, when the shards run in its process (flows/warm.py)."""
    cfg, dev = _config(score_config), str(resolve_device(device))
    _suite(cfg, dev, tuple(skip))
    _fid_extractor(cfg, skip, dev)


def _config(score_config: dict) -> ScoreConfig:
    return ScoreConfig(**{**score_config, "metrics": tuple(score_config["metrics"])})


def _fid_extractor(cfg: ScoreConfig, skip: list[str], device: str):
    """The FID Inception a shard needs (None without FID)."""
    return extractor(cfg.fid_convention, device) if "fid" in cfg.metrics and "fid" not in skip else None


def _decode(data, name: str) -> np.ndarray:
    if isinstance(data, Exception):
        raise ImageError(f"cannot read: {type(data).__name__}: {data}")
    return decode_source(data, name)[0]


def _tensor(rgbs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float() / 255.0


@task(name="score-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def score_shard(spec: ShardSpec, stage_uri: str, score_config: dict, skip: list[str], device: str,
                batch_size: int) -> dict:
    """Scores a shard batch by batch, the next batches fetched and decoded in a thread meanwhile (memory bounded
    by the batch, not the shard); with FID, also the shard's Inception features from the same decoded images,
    in one file."""
    cfg, dev = _config(score_config), resolve_device(device)
    suite = _suite(cfg, str(dev), tuple(skip))
    fid = _fid_extractor(cfg, skip, str(dev))
    rows = [json.loads(item.row) for item in spec.items]
    todo = [(k, item) for k, item in enumerate(spec.items) if rows[k]["status"] == "ok"]
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]

    def score_batch(batch_and_ready) -> tuple[list[str], np.ndarray | None]:
        """One batch's metric columns; with FID, its scored images' sha256 and Inception features."""
        batch, ready = batch_and_ready
        for _, group in groupby(sorted(ready, key=lambda r: r[1].shape), key=lambda r: r[1].shape):
            _score(suite, dev, rows, list(group))
        scored = [(k, img) for k, img, _ in ready if rows[k]["status"] == "ok"]
        features = fid([img for _, img in scored]) if fid is not None and scored else None
        report_images(spec.key, len(batch))  # the stage's bar moves per batch
        return [rows[k]["sha256"] for k, _ in scored], features

    keys, feats = [], []
    with ThreadPoolExecutor(1, thread_name_prefix="score-decode") as pool:
        decoded = prefetched(pool, lambda batch: _fetch_and_decode(suite, rows, batch), batches)
        # on the CPU a shard with idle cores beside it scores batches on them at once (each batch's rows are its own)
        in_order = lane_imap if dev.type == "cpu" else map
        for batch_keys, features in in_order(score_batch, zip(batches, decoded)):
            if features is not None:
                keys += batch_keys
                feats.append(features)
    if fid is not None:
        from bfr_models.metrics.fid import shard_features_uri, write_shard_features  # torchvision: only for FID

        write_shard_features(shard_features_uri(stage_uri, spec.key), fid.fingerprint, keys,
                             np.concatenate(feats) if feats else np.zeros((0, 2048)))
    return asdict(ManifestWriter(stage_uri).write_shard(spec.key, stamp(rows, dev)))


def _fetch_and_decode(suite: MetricSuite, rows: list[dict], todo: list) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """Fetch and decode one batch of rows (and their references); a bad image becomes an error row."""
    wanted = [i.uri for _, i in todo] + [i.reference for _, i in todo if suite.needs_reference and i.reference]
    fetched = read_many(sorted(set(wanted)))
    ready = []
    for k, item in todo:
        data = fetched[item.uri]
        if rows[k]["sha256"] is None and isinstance(data, bytes):  # a folder input: identify it by content now
            sha256 = storage.sha256_hex(data)
            rows[k].update(sha256=sha256, image_id=digest_id(sha256, item.name))
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
    return ready


def _score(suite: MetricSuite, dev: torch.device, rows: list[dict], batch: list) -> None:
    """Metric columns of one same-size batch; a metric an image cannot have is NaN with a note in ``score_notes``."""
    refs = _tensor([r for _, _, r in batch]) if suite.needs_reference else None
    scores, notes = suite(_tensor([img for _, img, _ in batch]), refs)
    for j, (k, _, _) in enumerate(batch):
        rows[k].update({m: float(v[j]) for m, v in scores.items()})
        if notes[j]:
            rows[k]["score_notes"] = "; ".join(f"{m}: {reason}" for m, reason in sorted(notes[j].items()))
