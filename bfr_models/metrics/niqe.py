"""NIQE (Mittal, Soundararajan & Bovik, "Making a 'completely blind' image quality analyzer", 2012), batched in torch.

Model: the official LIVE pristine multivariate Gaussian (36-d mean and covariance from the NIQE release's
``modelparameters.mat``), read from ``catalogs/metrics/niqe_pris_params.npz`` -- a byte copy of the file
basicsr ships as ``basicsr/metrics/niqe_pris_params.npz``; see ``catalogs/metrics/PROVENANCE.md``.

Two conventions (``docs/niqe_calibration.md`` has the per-image calibration table and the reasoning):

``pyiqa``  (default; pyiqa's ``niqe``, the number most published BFR tables report)
    Gray = round-half-even(255 * (0.299 R + 0.587 G + 0.114 B)) computed in float32, the formula of
    ``pyiqa.utils.color_util.to_y_channel(x, 255, 'yiq')`` on a float32 image. pyiqa computes it as a
    float32 matmul whose rounding depends on the CPU's kernels while we sum the three products, so a
    few gray levels can round the other way (14 of 983,040 pixels on one machine). The MSCN filter
    uses pyiqa's window (``fspecial(7, 7/6)`` rounded to float32) and sums the 49 taps in the order
    pyiqa's / scipy's CPU convolution does; the half-scale image is made in float32 as pyiqa's
    ``imresize`` does. Within 0.5% of live pyiqa on the TID2013 calibration images (the tested bar;
    1.7e-4 relative on one machine).
``live_computequality`` (alias ``matlab``; the official LIVE NIQE release's ``computequality.m``, not
    MATLAB's built-in ``niqe()``, which has another pristine model)
    Gray = MATLAB ``rgb2gray`` of the 8-bit image (0.298936021293775 R + 0.587043074451121 G +
    0.114020904255103 B, round half away from zero), all in float64, and local-mean residues that are
    zero in exact arithmetic (flat regions) are exactly zero. Within 0.6% of the official values on the
    TID2013 calibration images; ``pyiqa`` is up to 5% off them where an image has flat regions.

Everything else is common to both and follows the official code: image cropped to whole 96x96
blocks, two scales (the second by MATLAB's antialiased bicubic ``imresize(., 0.5)``), MSCN with a 7x7
Gaussian (sigma 7/6, replicate border, ``+1`` in the denominator), per block the 18 AGGD features of
the MSCN map and of its four neighbour products (circular shifts inside the block), alpha by the
0.2:0.001:10 lookup table, NaN-aware mean, complete-rows covariance and ``pinv``.

All of it is vectorised over images and blocks (no per-block Python loop). Convolution and resizing
are written as explicit, ordered sums of elementwise products, never ``conv2d``/matmul, so a result does
not depend on the device or the BLAS: the same image gives the same bits on CPU and GPU up to the
summation order of the block reductions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bfr_models.metrics.fullref import matlab_gray_levels

CONVENTIONS = ("pyiqa", "live_computequality")
CONVENTION_ALIASES = {"matlab": "live_computequality"}  # the old name: accepted, recorded under the new one
BLOCK = 96
PRISTINE_FILE = "niqe_pris_params.npz"

_YIQ_GRAY = (0.299, 0.587, 0.114)
# |im - local mean| at or below this (0..255 scale) is exactly zero for the live_computequality convention. Float64
# rounding leaves < 1e-12 in flat areas (49 products of values <= 255); the smallest genuine residues on
# the calibration images are > 1e-9 (half-scale bicubic tails); any threshold in [1e-12, 1e-10] gives
# the same scores there.
_EXACT_ZERO_TOL = 1e-11
_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))
_CPU_CHUNK_PIXELS = 1 << 18
_CPU_CHUNK_VALUES = 1 << 17  # float64 values per pass of the 7x7 filter on CPU: three such arrays fit in L2


def pristine_params_path() -> Path:
    from bfr_models.choices import catalogs_dir

    return catalogs_dir() / "metrics" / PRISTINE_FILE


@lru_cache(maxsize=1)
def pristine_params() -> tuple[np.ndarray, np.ndarray]:
    """(mu (36,), cov (36, 36)) float64 of the LIVE pristine model."""
    path = pristine_params_path()
    if not path.is_file():
        raise FileNotFoundError(f"NIQE pristine model not found: {path} (see catalogs/metrics/PROVENANCE.md)")
    with np.load(path) as z:
        mu = np.asarray(z["mu_pris_param"], dtype=np.float64).reshape(-1)
        cov = np.asarray(z["cov_pris_param"], dtype=np.float64)
    if mu.shape != (36,) or cov.shape != (36, 36):
        raise ValueError(f"{path}: expected mu (36,) and cov (36, 36), got {mu.shape} and {cov.shape}")
    return mu, cov


def _fspecial_gaussian(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """MATLAB ``fspecial('gaussian', size, sigma)`` in float64 (pyiqa's ``fspecial`` before its float32 cast)."""
    m = (size - 1.0) / 2.0
    y, x = np.ogrid[-m:m + 1, -m:m + 1]
    h = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return h / h.sum()


@lru_cache(maxsize=2)
def _window(convention: str) -> tuple[float, ...]:
    h = _fspecial_gaussian()
    if convention == "pyiqa":
        h = h.astype(np.float32).astype(np.float64)  # pyiqa's fspecial returns .float()
    else:
        h = h / h.sum()  # computequality.m renormalises: window/sum(sum(window))
    return tuple(float(v) for v in h.reshape(-1))


@lru_cache(maxsize=1)
def _aggd_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """gam = 0.2:0.001:10, r(gam), sqrt(G(1/a)/G(3/a)), G(2/a)/G(1/a), all float64."""
    from scipy.special import gamma

    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = np.square(gamma(2.0 / gam)) / (gamma(1.0 / gam) * gamma(3.0 / gam))
    assert len(gam) == 9801 and np.all(np.diff(r_gam) > 0)
    beta_scale = np.sqrt(gamma(1.0 / gam) / gamma(3.0 / gam))
    mean_scale = gamma(2.0 / gam) / gamma(1.0 / gam)
    return gam, r_gam, beta_scale, mean_scale


# ----------------------------------------------------------------------------------------------- gray


def _gray(images: torch.Tensor, convention: str) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B, 1, H, W) float64 integer-valued gray in [0, 255]."""
    if images.shape[1] == 1:
        g = images.to(torch.float64) * 255.0
        return torch.round(g) if convention == "pyiqa" else torch.floor(g + 0.5)
    if convention == "pyiqa":
        x = images.to(torch.float32)
        c0, c1, c2 = (torch.tensor(c, dtype=torch.float32) for c in _YIQ_GRAY)
        y = (x[:, 0:1] * c0 + x[:, 1:2] * c1 + x[:, 2:3] * c2) * 255.0
        return torch.round(y).to(torch.float64)  # half to even, as torch.round in pyiqa
    return matlab_gray_levels(images)  # rgb2gray of the 8-bit image, as computequality.m reads it


# ------------------------------------------------------------------------------------- filter, resize


def _filter7(x: torch.Tensor, window: tuple[float, ...]) -> torch.Tensor:
    """7x7 correlation with replicate padding, as the ordered sum over taps (row-major) of separately rounded
    products -- the arithmetic of scipy.ndimage / torch's CPU conv2d, reproducible on any device."""
    h, w = x.shape[-2:]
    planes = x.reshape(-1, h, w)
    out = torch.empty_like(planes)
    # On CPU the 49 passes run over chunks of ~128k values (a few planes, or a band of rows of a large one), so
    # the padded input, the product and the sum stay in L2 (NIQE at 256 px: 9.0 -> 7.5 ms an image on one
    # thread). A GPU takes the whole batch. The arithmetic per output value, and so the result, is the same.
    on_cpu = x.device.type == "cpu"
    plane_step = max(1, _CPU_CHUNK_VALUES // (h * w)) if on_cpu else planes.shape[0]
    row_step = max(1, _CPU_CHUNK_VALUES // w) if on_cpu and plane_step == 1 else h
    for p0 in range(0, planes.shape[0], plane_step):
        padded = torch.nn.functional.pad(planes[p0:p0 + plane_step].unsqueeze(1), (3, 3, 3, 3),
                                         mode="replicate").squeeze(1)
        for r0 in range(0, h, row_step):
            acc = out[p0:p0 + plane_step, r0:r0 + row_step]
            rows = acc.shape[1]
            acc.zero_()
            term = torch.empty_like(acc)
            for k, wk in enumerate(window):
                if wk != 0.0:
                    i, j = divmod(k, 7)
                    torch.mul(padded[:, r0 + i:r0 + i + rows, j:j + w], wk, out=term)
                    acc.add_(term)  # a separate add: never fused into an FMA
    return out.reshape(x.shape)


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


@lru_cache(maxsize=64)
def _half_weights(n: int, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize(., 0.5, 'bicubic') with antialiasing along one axis of length n:
    (indices (n_out, taps) into 0..n-1 with symmetric boundary, weights (n_out, taps))."""
    scale = 0.5
    n_out = math.ceil(n * scale)
    if convention == "pyiqa":
        # pyiqa.matlab_utils.imresize: weights computed in float32 from float32 positions, 10 taps.
        taps = math.ceil(4 / scale) + 2
        pos = torch.linspace(0, n_out - 1, steps=n_out, dtype=torch.float32)
        pos = (pos + 0.5) / scale - 0.5
        base = pos.floor() - (taps // 2) + 1
        dist = pos - base
        buf = torch.stack([dist - k for k in range(taps)]) * scale
        ax = buf.abs()
        ax2 = ax * ax
        ax3 = ax * ax2
        a = -0.5
        c01 = ((a + 2) * ax3 - (a + 3) * ax2 + 1) * ax.le(1).to(torch.float32)
        c12 = ((a * ax3) - (5 * a * ax2) + (8 * a * ax) - (4 * a)) * (ax.gt(1) & ax.le(2)).to(torch.float32)
        wgt = c01 + c12
        wgt = wgt / wgt.sum(dim=0, keepdim=True)
        idx = base.long()[None, :] + torch.arange(taps)[:, None]
        weights, indices = wgt.T.numpy().astype(np.float32), idx.T.numpy()
    else:
        # MATLAB imresize.m contributions(): u = x/scale + 0.5*(1-1/scale), kernel width 4/scale.
        x = np.arange(1, n_out + 1, dtype=np.float64)
        u = x / scale + 0.5 * (1 - 1 / scale)
        width = 4.0 / scale
        left = np.floor(u - width / 2)
        taps = int(math.ceil(width)) + 2
        idx1 = left[:, None] + np.arange(taps)[None, :]  # 1-based
        weights = scale * _cubic(scale * (u[:, None] - idx1))
        weights = weights / weights.sum(axis=1, keepdims=True)
        indices = idx1.astype(np.int64) - 1
    # symmetric ("reflect including the edge") boundary, as both MATLAB and pyiqa do
    period = np.concatenate([np.arange(n), np.arange(n - 1, -1, -1)])
    indices = period[np.mod(indices, 2 * n)]
    return indices, weights


def _resize_axis(x: torch.Tensor, dim: int, convention: str) -> torch.Tensor:
    idx_np, w_np = _half_weights(x.shape[dim], convention)
    idx = torch.from_numpy(idx_np).to(x.device)
    w = torch.from_numpy(w_np).to(device=x.device, dtype=x.dtype)
    out = None
    for k in range(idx.shape[1]):
        sample = x.index_select(dim, idx[:, k])
        wk = w[:, k].view(-1, 1) if dim == -2 else w[:, k].view(1, -1)
        term = sample * wk
        out = term if out is None else out + term
    return out


def _half(x: torch.Tensor, convention: str) -> torch.Tensor:
    """MATLAB imresize(x, 0.5) (bicubic, antialiased) of (B, 1, H, W) on the 0..255 scale; rows first."""
    if convention == "pyiqa":
        y = (x / 255.0).to(torch.float32)
        y = _resize_axis(_resize_axis(y, -2, convention), -1, convention)
        return y.to(torch.float64) * 255.0
    return _resize_axis(_resize_axis(x, -2, convention), -1, convention)


# ------------------------------------------------------------------------------------------- features


def _aggd(v: torch.Tensor, tables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """AGGD fit of every row of v (..., n) by the official moment-matching lookup.
    Returns alpha, beta_l, beta_r and the lookup index (..., )."""
    v2 = v * v
    neg, pos = v < 0, v > 0
    left_std = torch.sqrt((v2 * neg).sum(-1) / neg.sum(-1))
    right_std = torch.sqrt((v2 * pos).sum(-1) / pos.sum(-1))
    gammahat = left_std / right_std
    rhat = v.abs().mean(-1) ** 2 / v2.mean(-1)
    rhatnorm = (rhat * (gammahat ** 3 + 1) * (gammahat + 1)) / ((gammahat ** 2 + 1) ** 2)
    r_gam = tables["r_gam"]
    hi = torch.searchsorted(r_gam, rhatnorm.contiguous()).clamp(1, r_gam.numel() - 1)
    lo = hi - 1
    d_lo = (r_gam[lo] - rhatnorm) ** 2
    d_hi = (r_gam[hi] - rhatnorm) ** 2
    index = torch.where(d_hi < d_lo, hi, lo)
    index = torch.where(torch.isnan(rhatnorm), torch.zeros_like(index), index)  # argmin of all-NaN -> first
    scale = tables["beta_scale"][index]
    return tables["gam"][index], left_std * scale, right_std * scale, index


def _block_features(mscn: torch.Tensor, block: int, tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 1, H, W) MSCN map -> (B, n_blocks, 18) features; blocks in MATLAB blkproc order (column-major)."""
    b, _, h, w = mscn.shape
    nh, nw = h // block, w // block
    blocks = mscn.reshape(b, nh, block, nw, block).permute(0, 3, 1, 2, 4).reshape(b, nw * nh, block, block)
    alpha, beta_l, beta_r, _ = _aggd(blocks.reshape(b, nw * nh, -1), tables)
    feats = [alpha, (beta_l + beta_r) / 2]
    for shift in _SHIFTS:
        pair = blocks * torch.roll(blocks, shifts=shift, dims=(-2, -1))
        alpha, beta_l, beta_r, index = _aggd(pair.reshape(b, nw * nh, -1), tables)
        mean = (beta_r - beta_l) * tables["mean_scale"][index]
        feats += [alpha, mean, beta_l, beta_r]
    return torch.stack(feats, dim=-1)


def _tables(device: torch.device) -> dict[str, torch.Tensor]:
    gam, r_gam, beta_scale, mean_scale = _aggd_tables()
    return {k: torch.from_numpy(v).to(device) for k, v in
            dict(gam=gam, r_gam=r_gam, beta_scale=beta_scale, mean_scale=mean_scale).items()}


def niqe_features(gray: torch.Tensor, convention: str = "pyiqa") -> torch.Tensor:
    """(B, 1, H, W) float64 gray on the 0..255 scale (H, W multiples of 96) -> (B, n_blocks, 36) features."""
    window = _window(convention)
    tables = _tables(gray.device)
    img = gray
    out = []
    for scale in (1, 2):
        mu, mean_sq = _filter7(torch.cat([img, img * img], dim=1), window).split(1, dim=1)
        var = (mean_sq - mu * mu).abs()
        if convention == "pyiqa":
            var = var + torch.finfo(torch.float64).eps  # pyiqa's safe_sqrt
        sigma = torch.sqrt(var)
        diff = img - mu
        if convention == "live_computequality":
            diff = torch.where(diff.abs() <= _EXACT_ZERO_TOL, torch.zeros_like(diff), diff)
        mscn = diff / (sigma + 1)
        out.append(_block_features(mscn, BLOCK // scale, tables))
        if scale == 1:
            img = _half(img, convention)
    return torch.cat(out, dim=-1)


def _mvg_distance(feats: torch.Tensor) -> torch.Tensor:
    """NIQE from (B, n_blocks, 36) features: sqrt((mu_p-mu)^T pinv((C_p+C)/2) (mu_p-mu)), NaN-aware like MATLAB."""
    mu_p, cov_p = (torch.from_numpy(a).to(feats.device) for a in pristine_params())
    nan = torch.isnan(feats)
    mu_d = torch.where(nan, torch.zeros_like(feats), feats).sum(1) / (~nan).sum(1)  # nanmean per column
    valid = ~nan.any(-1, keepdim=True)  # nancov: complete rows only
    n_valid = valid.sum(1)
    fz = torch.where(valid, feats, torch.zeros_like(feats))
    centred = (fz - fz.sum(1, keepdim=True) / n_valid.unsqueeze(1)) * valid
    cov_d = centred.transpose(1, 2) @ centred / (n_valid - 1).unsqueeze(-1)
    pooled = (cov_p + cov_d) / 2
    # Fewer than two blocks with finite features (a flat image): no covariance, the score is NaN.
    ok = torch.isfinite(pooled).all(-1).all(-1) & torch.isfinite(mu_d).all(-1)
    pooled = torch.where(ok[:, None, None], pooled, cov_p.expand_as(pooled))
    inv = torch.linalg.pinv(pooled)
    diff = (mu_p - torch.where(ok[:, None], mu_d, mu_p)).unsqueeze(1)
    score = torch.sqrt((diff @ inv @ diff.transpose(1, 2)).reshape(-1))
    return torch.where(ok, score, torch.full_like(score, float("nan")))


def _niqe_same_size(images: torch.Tensor, convention: str, crop_border: int) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"NIQE expects (B, 3, H, W) or (B, 1, H, W) images, got shape {tuple(images.shape)}")
    gray = _gray(images, convention)
    if crop_border:
        gray = gray[..., crop_border:-crop_border, crop_border:-crop_border]
    h, w = gray.shape[-2:]
    nh, nw = h // BLOCK, w // BLOCK
    if nh * nw < 2:
        raise ValueError(f"NIQE needs at least two {BLOCK}x{BLOCK} blocks; "
                         f"image is {h}x{w} after crop_border={crop_border}")
    gray = gray[..., : nh * BLOCK, : nw * BLOCK]
    # A GPU takes the whole batch; on CPU a few images at a time keep the temporaries in cache (the
    # arithmetic, and so the result, is the same either way).
    step = gray.shape[0] if gray.device.type != "cpu" else max(1, _CPU_CHUNK_PIXELS // (nh * nw * BLOCK * BLOCK))
    feats = torch.cat([niqe_features(gray[i:i + step], convention) for i in range(0, gray.shape[0], step)])
    return _mvg_distance(feats)


def niqe_convention(name: str) -> str:
    """The convention's name as recorded (an alias maps to it); ValueError for an unknown one."""
    name = CONVENTION_ALIASES.get(name, name)
    if name not in CONVENTIONS:
        raise ValueError(f"unknown NIQE convention {name!r}; use one of "
                         f"{', '.join(CONVENTIONS + tuple(CONVENTION_ALIASES))}")
    return name


@torch.no_grad()
def niqe(images: torch.Tensor | Sequence[torch.Tensor], convention: str = "pyiqa",
         crop_border: int = 0) -> torch.Tensor:
    """NIQE of each image (lower is better).

    images: (B, 3, H, W) RGB or (B, 1, H, W) gray, float in [0, 1], on any device; or a list of such
    tensors / (C, H, W) tensors of different sizes (grouped by size, results in input order).
    crop_border: pixels dropped on each side (after the gray conversion) before the 96x96 blocking.
    Returns a float64 tensor (B,) on the images' device. An image with fewer than two 96x96 blocks
    raises ValueError; one without texture to fit (e.g. constant: every block's features are NaN)
    scores NaN.
    """
    convention = niqe_convention(convention)
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if isinstance(images, torch.Tensor):
        return _niqe_same_size(images, convention, crop_border)
    items = [im if im.ndim == 4 else im.unsqueeze(0) for im in images]
    if not items:
        return torch.zeros(0, dtype=torch.float64)
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(items):
        groups.setdefault((tuple(im.shape[1:]), im.device), []).append(i)
    sizes = [im.shape[0] for im in items]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    out = torch.empty(int(offsets[-1]), dtype=torch.float64, device=items[0].device)
    for members in groups.values():
        scores = _niqe_same_size(torch.cat([items[i] for i in members]), convention, crop_border)
        pos = 0
        for i in members:
            out[offsets[i]:offsets[i + 1]] = scores[pos:pos + sizes[i]].to(out.device)
            pos += sizes[i]
    return out
