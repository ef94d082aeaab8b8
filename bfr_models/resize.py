"""MATLAB ``imresize`` bicubic in torch: the one MATLAB-style resize of the project (Φ_N, DifBFSR's
band, the ``bicubic_matlab`` degradation resize).

It follows MATLAB's ``imresize(x, [h w], 'bicubic')`` exactly, as ILVR's / DR2's
``resizer.py`` (Shocher's Resizer) and BasicSR's ``matlab_functions.imresize`` do:

- Keys cubic kernel with a = -0.5; pixel centres at ``(i + 0.5) / scale - 0.5``;
- downscaling is antialiased: the kernel is stretched by ``1 / scale`` (width ``4 / scale``) and
  scaled by ``scale``; upscaling uses the plain 4-tap kernel;
- each output's weights are normalised to sum to one;
- border rule: taps that fall outside the image are mirrored *symmetrically* (the edge pixel is
  repeated: ``... x1 x0 | x0 x1 ...``, MATLAB's and the Resizer's boundary handling), so the kernel
  is never truncated or renormalised at the border.

Each axis is one precomputed ``(out, in)`` weight matrix (cached per size, device and dtype); a
batch is resized by two batched matrix products per image plane, on GPU batches as on the CPU.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel, a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


@lru_cache(maxsize=64)
def _weights(n_in: int, n_out: int) -> np.ndarray:
    """The ``(n_out, n_in)`` float64 matrix of MATLAB's bicubic resize along one axis."""
    scale = n_out / n_in
    stretch = min(scale, 1.0)  # antialias only when shrinking
    width = 4.0 / stretch
    centre = (np.arange(n_out) + 0.5) / scale - 0.5  # output pixel centres in input coordinates (0-based)
    first = np.floor(centre - width / 2).astype(np.int64)
    taps = first[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
    w = stretch * _cubic(stretch * (centre[:, None] - taps))
    w /= w.sum(1, keepdims=True)
    period = 2 * n_in  # symmetric mirror: 0..n-1, n-1..0, repeated
    folded = np.mod(taps, period)
    folded = np.where(folded >= n_in, period - 1 - folded, folded)
    out = np.zeros((n_out, n_in))
    np.add.at(out, (np.repeat(np.arange(n_out), taps.shape[1]), folded.ravel()), w.ravel())
    return out


_DEVICE_WEIGHTS: dict = {}


def _weights_on(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (n_in, n_out, str(device), dtype)
    if key not in _DEVICE_WEIGHTS:
        _DEVICE_WEIGHTS[key] = torch.from_numpy(_weights(n_in, n_out)).to(device=device, dtype=dtype)
    return _DEVICE_WEIGHTS[key]


def matlab_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """MATLAB ``imresize(x, size, 'bicubic')`` (antialiased when shrinking) of ``(..., H, W)``.

    Rows first, then columns, as MATLAB does when shrinking; identity when already at ``size``.
    """
    h, w = int(size[0]), int(size[1])
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        return x
    if not x.is_floating_point():
        raise ValueError(f"matlab_resize: expected a floating-point tensor, got {x.dtype}")
    lead = x.shape[:-2]
    planes = x.reshape(-1, H, W)
    n = planes.shape[0]
    rows = _weights_on(H, h, x.device, x.dtype).expand(n, h, H)
    cols = _weights_on(W, w, x.device, x.dtype).T.expand(n, W, w)
    # bmm: one same-shape product per plane, so a plane's result does not depend on how many
    # planes are in the batch (torch.matmul would fold the batch into one GEMM of batch-dependent size)
    return torch.bmm(torch.bmm(rows, planes), cols).reshape(*lead, h, w)


def at_resolution(fn, x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """``fn(x)`` for a model trained at ``resolution`` x ``resolution`` pixels, applied at that size: a batch
    (B, 3, H, W) in [0, 1] of another size is resized in and the output back to (H, W) (MATLAB bicubic, clamped
    to [0, 1]). A model run at a size it never saw sees faces of another scale (and its self-attention costs
    grow with the area); ``resolution`` None (not recorded) or the same size: ``fn(x)`` as it is."""
    size = tuple(x.shape[-2:])
    if resolution is None or size == (resolution, resolution):
        return fn(x)
    out = fn(matlab_resize(x, (resolution, resolution)).clamp(0, 1))
    return matlab_resize(out, size).clamp(0, 1)


def is_resized(size: tuple[int, int], resolution: int | None) -> bool:
    """Whether :func:`at_resolution` resizes images of ``size`` (H, W) for a model of ``resolution``."""
    return resolution is not None and tuple(size) != (resolution, resolution)
