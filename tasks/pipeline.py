"""A shard's batch loop as a pipeline: the next batch is fetched and decoded in a thread while the current one
computes; a batch comes back from the device in one copy; PNG encoding and writes (concurrent PUTs on S3) run
in a bounded pool. Memory stays bounded: at most ``PREFETCH`` batches decoded ahead and ``2 x batch`` images
waiting to be written. Batches, rows and their order are exactly those of the serial loop (see ``_order``)."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from bfr_models.imageio import encode_png
from tasks.rows import Written, decode_items, error_row, write_output
from tasks.runtime import report_images
from tasks.shards import InputItem, read_many

PREFETCH = 2  # batches decoded ahead of the device
WRITERS = min(8, (os.cpu_count() or 1) + 2)  # PNG encodes release the GIL; S3 PUTs mostly wait


class Decoded(NamedTuple):
    item: InputItem
    parent_id: str
    rgb: np.ndarray  # (H, W, 3) uint8
    source: dict  # what decoding recorded about the source file
    data: bytes  # the fetched file


class ShardPipeline:
    """Feeds a shard task same-size batches and collects its rows in the serial loop's order.

    ``per_chunk=True``: fetch ``batch_size`` items, batch them by size, then the next ones (degrade: a batch
    never waits for later files). ``per_chunk=False``: batches by size over the whole shard, as if every image
    had been decoded first (a size's batches are its images in shard order, ``batch_size`` at a time).
    """

    def __init__(self, stage: str, items, batch_size: int, per_chunk: bool, shard: str | None = None):
        self.stage, self.items, self.batch_size, self.per_chunk = stage, list(items), batch_size, per_chunk
        self.shard = shard  # its key: each batch is reported done when the next is asked for (the progress bar)
        self._index = {id(item): k for k, item in enumerate(self.items)}
        self._rows: list[tuple[tuple, Future | dict]] = []  # (order, row or the write that builds it)
        self._pending: deque[Future] = deque()
        self._decode = ThreadPoolExecutor(1, thread_name_prefix=f"{stage}-decode")
        self._write = ThreadPoolExecutor(WRITERS, thread_name_prefix=f"{stage}-write")
        self._chunk = 0

    def __enter__(self) -> ShardPipeline:
        return self

    def __exit__(self, *exc) -> None:
        for f in self._pending:
            f.cancel()
        self._decode.shutdown(wait=True, cancel_futures=True)
        self._write.shutdown(wait=True, cancel_futures=True)

    def _order(self, item: InputItem, decode_error: bool = False, shape: tuple = ()) -> tuple:
        """Where a row goes: the serial loop wrote a chunk's (per_chunk) or the shard's decode errors first,
        then the rows of its batches by image size, each in shard order."""
        group = self._chunk if self.per_chunk else 0
        return (group, 0, self._index[id(item)]) if decode_error else (group, 1, shape, self._index[id(item)])

    def _fetch_decode(self, chunk: list[InputItem]) -> list[tuple[InputItem, Decoded | dict]]:
        """Each item of a chunk with its decoded image or its error row."""
        fetched = read_many([i.uri for i in chunk])
        out = []
        for item in chunk:
            good, errors = decode_items(self.stage, [item], fetched)
            out.append((item, Decoded(*good[0], fetched[item.uri]) if good else errors[0]))
        return out

    def batches(self) -> Iterator[list[Decoded]]:
        """Same-size batches; fetching and decoding run ``PREFETCH`` chunks ahead in a thread."""
        n = self.batch_size
        chunks = [self.items[i : i + n] for i in range(0, len(self.items), n)]
        waiting: dict[tuple, list[Decoded]] = {}  # shape -> images not yet in a batch
        for k, decoded in enumerate(prefetched(self._decode, self._fetch_decode, chunks)):
            self._chunk = k if self.per_chunk else 0
            for item, d in decoded:
                if isinstance(d, dict):  # an error row
                    self._rows.append((self._order(item, decode_error=True), d))
                    continue
                group = waiting.setdefault(d.rgb.shape, [])
                group.append(d)
                if len(group) == n:
                    yield waiting.pop(d.rgb.shape)
                    report_images(self.shard, n)
            if self.per_chunk or k == len(chunks) - 1:
                for shape in sorted(waiting):
                    batch = waiting.pop(shape)
                    yield batch
                    report_images(self.shard, len(batch))

    def add_row(self, d: Decoded, row: dict) -> None:
        """A row that needs no writing (e.g. an image that failed on the device)."""
        self._rows.append((self._order(d.item, shape=d.rgb.shape), row))

    def error(self, batch: list[Decoded], reason: str) -> None:
        for d in batch:
            self.add_row(d, error_row(self.stage, d.item, reason))

    def write(self, d: Decoded, writer, rgb: np.ndarray, make_row: Callable[[Written], dict]) -> None:
        """In the pool: encode ``rgb`` as PNG, write it under the row's id, and build the row with
        ``make_row(written)``. Waits for the oldest writes while ``2 x batch`` images are in flight."""
        future = self._write.submit(lambda: make_row(write_output(writer, encode_png(rgb), d.parent_id)))
        self._pending.append(future)
        while len(self._pending) > 2 * self.batch_size:
            self._pending.popleft().result()
        self._rows.append((self._order(d.item, shape=d.rgb.shape), future))

    def rows(self) -> list[dict]:
        """Every row, in order, once every write finished (a failed write raises here)."""
        ordered = sorted(self._rows, key=lambda r: r[0])
        return [row.result() if isinstance(row, Future) else row for _, row in ordered]


def prefetched(pool: ThreadPoolExecutor, fn: Callable, chunks: list) -> Iterator:
    """``fn(chunk)`` of each chunk in order, computed in ``pool`` while at most ``PREFETCH`` results wait."""
    ahead = deque(pool.submit(fn, c) for c in chunks[:PREFETCH])
    for k in range(len(chunks)):
        result = ahead.popleft().result()
        if k + PREFETCH < len(chunks):
            ahead.append(pool.submit(fn, chunks[k + PREFETCH]))
        yield result


def host_uint8(images: torch.Tensor | list[torch.Tensor]) -> list[np.ndarray]:
    """A batch (B, 3, H, W), or B images (3, h, w) of any sizes, in [0, 1] on any device -> B (h, w, 3) uint8
    arrays on the host. Converted on the device first (a quarter of float32's bytes); on CUDA the batch comes
    back in one copy, into pinned memory."""
    batches = [images] if isinstance(images, torch.Tensor) else [im.unsqueeze(0) for im in images]
    parts = [(x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1) for x in batches]
    if not parts or parts[0].device.type != "cuda":
        return [img.numpy() for part in parts for img in part.cpu()]
    flat = torch.cat([part.reshape(-1) for part in parts])
    host = torch.empty(flat.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    out, start = [], 0
    for part in parts:
        for shape in [part.shape[1:]] * part.shape[0]:
            out.append(host[start : start + shape.numel()].view(shape).numpy())
            start += shape.numel()
    return out


def host_batch(batch: list[Decoded], device: torch.device) -> torch.Tensor:
    """The batch as a (B, 3, H, W) uint8 tensor on ``device`` (from pinned memory, non-blocking, on CUDA)."""
    x = torch.from_numpy(np.stack([d.rgb for d in batch])).permute(0, 3, 1, 2)
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
