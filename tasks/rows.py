"""Building manifest rows: the one place that decides ids and the shape of error rows."""

from __future__ import annotations

import json
import os
import socket
from itertools import groupby
from typing import NamedTuple

import numpy as np
import torch

from bfr_models import storage
from bfr_models.imageio import ImageError, decode_source
from tasks.runtime import report_images
from tasks.shards import InputItem


def content_id(data: bytes, source: str) -> str:
    """Stable image_id: derived from the bytes and where they come from, never from a counter.

    ``source`` is the file's name relative to its input folder (for a folder's files) or the parent
    row's image_id (for an image a stage made): two byte-identical inputs, or identical outputs of two
    parents, get distinct ids (and distinct image files, which are named by the id).
    """
    return digest_id(storage.sha256_hex(data), source)


def digest_id(sha256: str, source: str) -> str:
    """content_id from the content's sha256 (hex)."""
    return storage.sha256_hex(f"{sha256}:{source}".encode())[:20]


def source_of(item: InputItem) -> str:
    """What an item's ids derive from besides content: its parent row, else its name in the input folder."""
    return item.parent_id or item.name or item.uri


def error_row(stage: str, item: InputItem, reason: str, data: bytes | None = None) -> dict:
    return {
        "image_id": content_id(item.uri.encode() if data is None else data, source_of(item)),
        "uri": None,
        "sha256": None,
        "parent_id": item.parent_id,
        "parent_uri": item.uri,
        "duplicate_of": item.duplicate_of,
        "source_name": item.source_name,
        "stage": stage,
        "split": item.split,
        "status": "error",
        "error": reason,
    }


def made_where(device) -> dict:
    """Where something is being made: ``worker`` (host:pid of this process, a Dask worker or the command's
    own) and ``device``, so a bad row or model can be traced to a node and a GPU."""
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "device": str(device)}


def stamp(rows: list[dict], device, **fields) -> list[dict]:
    """Record on every row where it was made (:func:`made_where`) and ``fields``."""
    where = {**made_where(device), **fields}
    for row in rows:
        row.update(where)
    return rows


class Written(NamedTuple):
    """An image file a row points to: its URI and its bytes' sha256 (hex), hashed once."""
    uri: str
    sha256: str


def write_output(writer, png: bytes, parent_id: str) -> Written:
    """Write a stage's output image under its row's image_id (:func:`content_id` of the PNG and its parent)."""
    sha256 = storage.sha256_hex(png)
    return Written(writer.write_image(digest_id(sha256, parent_id), png), sha256)


def ok_row(stage: str, item: InputItem, parent_id: str, image: Written, rgb: np.ndarray, **fields) -> dict:
    params = fields.pop("params", None)
    return {
        "image_id": digest_id(image.sha256, parent_id),
        "uri": image.uri,
        "sha256": image.sha256,
        "width": int(rgb.shape[1]),
        "height": int(rgb.shape[0]),
        "parent_id": parent_id,
        "parent_uri": item.uri,
        "duplicate_of": item.duplicate_of,
        "source_name": item.source_name,
        "stage": stage,
        "status": "ok",
        "params": json.dumps(params, sort_keys=True) if params is not None else None,
        **fields,
    }


def decode_items(stage: str, items, fetched: dict) -> tuple[list[tuple[InputItem, str, np.ndarray, dict]], list[dict]]:
    """Decode fetched bytes; returns (item, parent_id, rgb, source params) for good ones and error rows.

    A folder's file has no parent row: its parent_id is its own id, content_id(bytes, name).
    """
    good, errors = [], []
    for item in items:
        data = fetched[item.uri]
        if isinstance(data, Exception):
            errors.append(error_row(stage, item, f"cannot read: {type(data).__name__}: {data}"))
            continue
        try:
            rgb, source = decode_source(data, item.name or item.uri)
        except ImageError as e:
            errors.append(error_row(stage, item, str(e), data))
            continue
        good.append((item, item.parent_id or content_id(data, source_of(item)), rgb, source))
    return good, errors


def same_size_batches(decoded, batch_size: int, shard: str | None = None):
    """Consecutive batches of same-size decoded images (a batch is one tensor). With ``shard`` (the shard's
    key), each batch is reported done (:func:`tasks.runtime.report_images`) when the caller asks for the next,
    so the stage's progress bar moves per batch, not per finished shard."""
    by_size = sorted(decoded, key=lambda d: d[2].shape)
    for _, group in groupby(by_size, key=lambda d: d[2].shape):
        group = list(group)
        for i in range(0, len(group), batch_size):
            yield group[i : i + batch_size]
            report_images(shard, len(group[i : i + batch_size]))


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (img.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
