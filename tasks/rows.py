"""Building manifest rows: the one place that decides ids and the shape of error rows."""

from __future__ import annotations

import json
from itertools import groupby

import numpy as np
import torch

from bfr_models import storage
from bfr_models.imageio import ImageError, decode_rgb
from tasks.shards import InputItem, read_many


def content_id(data: bytes) -> str:
    """Stable image_id: derived from the bytes, never from a counter."""
    return storage.sha256_hex(data)[:20]


def error_row(stage: str, item: InputItem, reason: str, sha256: str | None = None) -> dict:
    return {
        "image_id": (sha256 or storage.sha256_hex(item.uri.encode()))[:20],
        "uri": None,
        "sha256": None,
        "parent_id": item.parent_id,
        "parent_uri": item.uri,
        "stage": stage,
        "split": item.split,
        "status": "error",
        "error": reason,
    }


def ok_row(stage: str, item: InputItem, parent_id: str, uri: str, png: bytes, rgb: np.ndarray, **fields) -> dict:
    params = fields.pop("params", None)
    return {
        "image_id": content_id(png),
        "uri": uri,
        "sha256": storage.sha256_hex(png),
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
        "parent_id": parent_id,
        "parent_uri": item.uri,
        "stage": stage,
        "status": "ok",
        "params": json.dumps(params, sort_keys=True) if params is not None else None,
        **fields,
    }


def decode_items(stage: str, items, fetched: dict) -> tuple[list[tuple[InputItem, str, np.ndarray, str]], list[dict]]:
    """Decode fetched bytes; returns (item, parent_id, rgb, source_mode) for good ones and error rows."""
    good, errors = [], []
    for item in items:
        data = fetched[item.uri]
        if isinstance(data, Exception):
            errors.append(error_row(stage, item, f"cannot read: {type(data).__name__}: {data}"))
            continue
        try:
            rgb, mode = decode_rgb(data)
        except ImageError as e:
            errors.append(error_row(stage, item, str(e), storage.sha256_hex(data)))
            continue
        good.append((item, item.parent_id or content_id(data), rgb, mode))
    return good, errors


def same_size_batches(decoded, batch_size: int):
    """Consecutive batches of same-size decoded images (a batch is one tensor)."""
    by_size = sorted(decoded, key=lambda d: d[2].shape)
    for _, group in groupby(by_size, key=lambda d: d[2].shape):
        group = list(group)
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]


def decoded_batches(stage: str, items, batch_size: int, errors: list[dict]):
    """Fetch and decode ``batch_size`` items at a time and yield their same-size batches, so a shard holds one
    batch of images in memory, not all of them; error rows are appended to ``errors``."""
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        decoded, bad = decode_items(stage, chunk, read_many([i.uri for i in chunk]))
        errors += bad
        yield from same_size_batches(decoded, batch_size)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
