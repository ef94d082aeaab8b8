"""PSNR and SSIM, batched in torch, in the BasicSR convention that BFR papers report.

Both take (B, 3, H, W) RGB (or (B, 1, H, W) gray) float images in [0, 1] on any device and return a
float64 tensor (B,) on that device. As in BasicSR's evaluation (``tensor2img`` then
``calculate_psnr`` / ``calculate_ssim``):

- images are first quantised to 8 bit, ``round(255 * clamp(x, 0, 1))`` (exact for images read from
  8-bit files);
- ``crop_border`` pixels are dropped on each side;
- ``y_channel=True`` uses the BT.601 luma of MATLAB's ``rgb2ycbcr`` on the 8-bit values,
  ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255`` (range 16..235, not rounded), as BasicSR's
  ``to_y_channel``; gray inputs are used as they are;
- PSNR = 10 log10(255^2 / MSE) over all pixels and channels in float64, ``inf`` for identical images;
- SSIM = Wang et al.'s: 11x11 Gaussian window, sigma 1.5, 'valid' filtering (no padding),
  K1 = 0.01, K2 = 0.03, L = 255, mean of the SSIM map, averaged over channels; no automatic
  downsampling.

``rgb2gray_matlab`` gives the gray image of MATLAB's ``rgb2gray`` (the input of the original SSIM and
NIQE MATLAB scripts), so ``ssim(rgb2gray_matlab(a), rgb2gray_matlab(b))`` is the original SSIM script's
value (the TID2013 calibration in ``../shared/calibration/tid2013`` is documented that way).
"""

from __future__ import annotations

import math

import torch

MATLAB_GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)  # rgb2gray.m coefficients
BT601_Y = (65.481, 128.553, 24.966)  # rgb2ycbcr.m, 8-bit: Y = 16 + (c . RGB) / 255

_C1 = (0.01 * 255) ** 2
_C2 = (0.03 * 255) ** 2


def quantize8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> 8-bit levels 0..255 as float64 (round half to even, as numpy/BasicSR)."""
    return torch.round(images.to(torch.float64).clamp(0, 1) * 255.0)


def matlab_gray_levels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, H, W) float64 levels 0..255 of MATLAB ``rgb2gray`` on the 8-bit image
    (its uint8 output rounds half away from zero)."""
    q = quantize8(images)
    c0, c1, c2 = MATLAB_GRAY
    return torch.floor(q[:, 0:1] * c0 + q[:, 1:2] * c1 + q[:, 2:3] * c2 + 0.5)


def rgb2gray_matlab(images: torch.Tensor) -> torch.Tensor:
    """MATLAB ``rgb2gray`` of the 8-bit image, as (B, 1, H, W) in [0, 1]."""
    return matlab_gray_levels(images) / 255.0


def y_bt601(levels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) 8-bit RGB levels (float64) -> (B, 1, H, W) BT.601 luma Y in [16, 235], unrounded."""
    c0, c1, c2 = BT601_Y
    return 16.0 + (levels[:, 0:1] * c0 + levels[:, 1:2] * c1 + levels[:, 2:3] * c2) / 255.0


def _prepare(a: torch.Tensor, b: torch.Tensor, crop_border: int, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4 or a.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 3, H, W) or (B, 1, H, W) images, got shape {tuple(a.shape)}")
    if crop_border < 0 or 2 * crop_border >= min(a.shape[-2:]):
        raise ValueError(f"crop_border={crop_border} leaves nothing of a {a.shape[-2]}x{a.shape[-1]} image")
    b = b.to(a.device)
    if crop_border:
        a = a[..., crop_border:-crop_border, crop_border:-crop_border]
        b = b[..., crop_border:-crop_border, crop_border:-crop_border]
    a, b = quantize8(a), quantize8(b)
    if y_channel and a.shape[1] == 3:
        a, b = y_bt601(a), y_bt601(b)
    return a, b


@torch.no_grad()
def psnr(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """PSNR in dB of each pair (B,), BasicSR ``calculate_psnr`` convention (see the module docstring)."""
    x, y = _prepare(a, b, crop_border, y_channel)
    mse = ((x - y) ** 2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0 ** 2 / mse)  # mse == 0 -> inf


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> list[float]:
    """cv2.getGaussianKernel(11, 1.5) / MATLAB fspecial('gaussian', 11, 1.5) separable factor, float64."""
    g = [math.exp(-((i - (size - 1) / 2) ** 2) / (2 * sigma * sigma)) for i in range(size)]
    s = sum(g)
    return [v / s for v in g]


_BAND_TILE = 256  # output rows per banded product: the work per row stays ~(TILE + 10) MACs at any image size


def _filter_rows_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """'valid' filtering of (..., H, W) along H with the 1-D kernel ``g``, as products of a banded matrix with
    strips of rows: float64 BLAS, 3-4x faster on a CPU than torch's depthwise float64 convolution at
    128-512 px (same sums, in another order: differences of ~1e-13)."""
    k, h = g.numel(), x.shape[-2] - g.numel() + 1
    rows = torch.arange(min(_BAND_TILE, h), device=x.device)
    band = torch.zeros(len(rows), len(rows) + k - 1, dtype=x.dtype, device=x.device)
    for i in range(k):
        band[rows, rows + i] = g[i]
    strips = []
    for r in range(0, h, _BAND_TILE):
        n = min(_BAND_TILE, h - r)
        strips.append(band[:n, : n + k - 1] @ x[..., r : r + n + k - 1, :])
    return torch.cat(strips, dim=-2)


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """'valid' 2-D Gaussian filtering of (N, C, H, W), as two separable 1-D passes (float64)."""
    return _filter_rows_valid(_filter_rows_valid(x, g).transpose(-1, -2), g).transpose(-1, -2)


@torch.no_grad()
def ssim(a: torch.Tensor, b: torch.Tensor, crop_border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """SSIM of each pair (B,), BasicSR ``calculate_ssim`` / original MATLAB script (see the module docstring)."""
    x, y = _prepare(a, b, crop_border, y_channel)
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels, got {x.shape[-2]}x{x.shape[-1]}")
    g = torch.tensor(_gaussian_1d(), dtype=torch.float64, device=x.device)
    n = x.shape[0]
    stats = _filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
    mu1, mu2, xx, yy, xy = stats.split(x.shape[1], dim=1)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq, sigma2_sq, sigma12 = xx - mu1_sq, yy - mu2_sq, xy - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + _C1) * (2 * sigma12 + _C2)) / ((mu1_sq + mu2_sq + _C1) * (sigma1_sq + sigma2_sq + _C2))
    return ssim_map.reshape(n, -1).mean(dim=1)
