"""Training data as a stream: torch Datasets over image URIs, fetched and decoded when a batch needs them.

Nothing holds a whole data set: a :class:`StepBatches` sampler names, for each training step, which
images form the batch and one seed per image; DataLoader workers fetch (any fsspec URI), decode, resize
and transform (flip, crop, degrade) those images from that seed, with bounded prefetch. A step's batch
is a function of (seed, step) alone, so a resumed run reads exactly the batches the interrupted one
would have, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from bfr_models import storage
from bfr_models.imageio import ImageError, decode_rgb
from bfr_models.pseudo_targets import to_resolution

PREFETCH = 2  # batches each worker prepares ahead: memory stays a few batches, not a data set


class TrainingDataError(ValueError):
    """A training image that cannot be read or decoded (one line naming the file)."""


def default_workers() -> int:
    """DataLoader workers: the cores beyond two (the training loop's and one for the rest), at most 8;
    0 on a 2-core machine, where a worker would only take turns with the loop (0: decode in the loop), and
    0 in a daemonic process (a Dask worker's, by default), which may not start processes."""
    if multiprocessing.current_process().daemon:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 2))


def step_seed(seed: int, step: int, salt: str = "") -> int:
    """A 63-bit seed for one step's draws, independent of every other step's."""
    digest = hashlib.blake2b(f"{salt}:{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StepBatches(Sampler):
    """For steps ``start..stop-1``: ``batch_size`` (image index, image seed) pairs drawn from (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int, salt: str = ""):
        self.n, self.batch_size, self.seed, self.start, self.stop, self.salt = n, batch_size, seed, start, stop, salt

    def batch(self, step: int) -> list[tuple[int, int]]:
        gen = torch.Generator().manual_seed(step_seed(self.seed, step, self.salt))
        idx = torch.randint(0, self.n, (self.batch_size,), generator=gen).tolist()
        seeds = torch.randint(0, 2**62, (self.batch_size,), generator=gen).tolist()
        return list(zip(idx, seeds))

    def __iter__(self):
        return (self.batch(step) for step in range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def read_image(uri: str, resolution: int | None = None) -> torch.Tensor:
    """One image as (3, H, W) float in [0, 1], resized to ``resolution`` square when given."""
    try:
        rgb, _ = decode_rgb(storage.read_bytes(uri))
    except (OSError, ImageError) as e:
        raise TrainingDataError(f"training image {uri} cannot be used: {e}") from None
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255.0  # a writable copy: decoders may share
    return to_resolution(x[None], resolution)[0] if resolution else x


class TensorImages(Dataset):
    """Images already in memory (N, 3, H, W): small sets and tests."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].float()


class UriImages(Dataset):
    """Images by URI, read when asked for: (3, R, R) in [0, 1] at ``resolution`` (native size when None)."""

    def __init__(self, uris: Sequence[str], resolution: int | None = None):
        self.uris, self.resolution = list(uris), resolution

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> torch.Tensor:
        return read_image(self.uris[i], self.resolution)


class Seeded(Dataset):
    """``transform(item, seed)`` of the items of ``base``, indexed by (index, seed) pairs from :class:`StepBatches`."""

    def __init__(self, base: Dataset, transform: Callable[[object, int], object]):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        i, seed = key
        return self.transform(self.base[i], seed)


def coin(seed: int) -> bool:
    """A fair coin drawn from ``seed`` (the flip of one image)."""
    return bool(torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < 0.5)


def step_loader(dataset: Dataset, transform: Callable[[object, int], object], batch_size: int, seed: int,
                start: int, stop: int, workers: int | None = None, salt: str = "") -> DataLoader:
    """The batches of steps ``start..stop-1``, prepared by ``workers`` processes (None: :func:`default_workers`)."""
    workers = default_workers() if workers is None else workers
    sampler = StepBatches(len(dataset), batch_size, seed, start, stop, salt)
    # spawn, not fork: training runs inside Prefect's threads, and a forked copy of them dies at start
    return DataLoader(Seeded(dataset, transform), batch_sampler=sampler, num_workers=workers,
                      prefetch_factor=PREFETCH if workers else None,
                      multiprocessing_context="spawn" if workers else None)
