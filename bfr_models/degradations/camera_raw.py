"""Target-domain camera-RAW degradation of the unsupervised-BFR paper (Kuai et al., Eq. 10 / Eq. 12).

    I_LQ = { ISP[ ISP^-1( (I_HQ)↓r ) + n_c ] }↑r

Implemented in the order of the official data-prep code (``generate_LQ_from_HQ.py``, see
``specs/unsupervised_pseudo_targets.md`` §3.2):

 1. sRGB in [0, 1] -> de-gamma ``x**2.2`` (a plain power law, as in the code, not the sRGB curve);
 2. inverse CCM (sRGB-linear -> camera RGB), then inverse white balance;
 3. downsample by ``r`` with area interpolation. NOTE: the code unprocesses *before*
    downsampling while Eq. 10 writes it after; we follow the code. Both steps are linear
    per pixel / per channel, so the only difference is rounding;
 4. mosaic to a Bayer GRBG pattern, map to 10-bit DN (black level 64, white level 1023);
 5. heteroscedastic Gaussian noise per CFA channel, ``var = beta1(ISO)*x + beta2(ISO)`` with
    ``x`` the clean value in DN (black level included), clamped at >= 0; clip to [0, 1023];
 6. subtract the black level and normalise;
 7. demosaic;
 8. re-apply white balance and CCM, gamma ``x**(1/2.2)``;
 9. bilinear resize back to the input size (``cv2.resize`` default = half-pixel bilinear).

Substitutions (the originals are not available offline):
 - CCM / illuminant: Graphics2RAW samples them (kNN, k=3) from ``ccm_awb_dictionary_52_plus_230.p``,
   which we do not have. We replace that dictionary with the small, well-known table of
   XYZ->camera matrices published with Brooks et al., "Unprocessing Images for Learned Raw
   Denoising" (CVPR 2019): a random convex combination of the four matrices, multiplied by the
   sRGB->XYZ (D65) matrix and row-normalised (so white stays white), is drawn per image, together
   with Brooks et al.'s white-balance gain ranges (red in [1.9, 2.4], blue in [1.5, 1.9], green 1).
   Brooks et al.'s extra brightness gain and tone-curve inversion are *not* applied: the spec's
   pipeline has only gamma, WB and CCM.
 - Noise profile: the official beta1/beta2 are per-channel SciPy splines over ISO that we cannot
   read; we interpolate the spec's calibration points (ISO 1200, 1599, 2401, 3199) piecewise
   linearly per channel and extrapolate linearly from the end segments (e.g. ISO 800).
 - Demosaic: DemosaicNet (Gharbi et al. 2016) weights are unavailable; we use the classical
   Malvar-He-Cutler (2004) gradient-corrected bilinear demosaic (plain bilinear also available),
   implemented in torch and batched.
 - No integer quantisation of DN is applied (the spec does not mention one).

Everything is batched in torch on the input's device; per-image noise comes from a per-image
``torch.Generator`` and only element-wise / per-image operations are used, so an image gives the
same result alone or inside a batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bfr_models.degradations.ops import each_image, weighted_channels

__all__ = [
    "BLACK_LEVEL",
    "WHITE_LEVEL",
    "CALIBRATION_ISO",
    "CALIBRATION_BETA1",
    "CALIBRATION_BETA2",
    "XYZ2CAMS",
    "RGB2XYZ",
    "noise_params",
    "sample_camera_raw_params",
    "degrade_camera_raw",
    "unprocess",
    "process",
    "mosaic_grbg",
    "cfa_channel_index",
    "raw_to_dn",
    "dn_to_raw",
    "add_heteroscedastic_noise",
    "demosaic",
    "area_downsample",
    "lowres_size",
]

GAMMA = 2.2
BLACK_LEVEL = 64.0
WHITE_LEVEL = 1023.0

# Noise calibration points (spec §3.2, from the official `model_params.npy`; "≈" values as
# quoted). Columns are the CFA channels in raster order of the 2x2 GRBG cell:
# 0 = G (R row), 1 = R, 2 = B, 3 = G (B row). beta1 = shot term, beta2 = read term (negative:
# the variance is meant to be evaluated on DN values that include the black level).
CALIBRATION_ISO = np.array([1200.0, 1599.0, 2401.0, 3199.0])
CALIBRATION_BETA1 = np.array(
    [
        [4.32, 5.06, 5.06, 4.31],
        [5.67, 6.76, 6.81, 5.73],
        [8.67, 10.36, 10.26, 8.64],
        [11.86, 13.94, 13.63, 11.85],
    ]
)
CALIBRATION_BETA2 = np.array(
    [
        [-215.7, -235.2, -241.9, -218.0],
        [-258.6, -285.9, -304.3, -255.5],
        [-310.7, -377.7, -398.8, -287.5],
        [-335.6, -444.9, -420.1, -315.9],
    ]
)

# Replacement for Graphics2RAW's unavailable CCM/illuminant dictionary: the XYZ->camera matrices
# published with Brooks et al. 2019 ("Unprocessing Images for Learned Raw Denoising",
# google-research/unprocessing, `random_ccm`).
XYZ2CAMS = np.array(
    [
        [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
        [[0.4913, -0.0541, -0.0202], [-0.613, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
        [[0.838, -0.263, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
        [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.097, 0.1581, 0.5181]],
    ]
)
# Linear sRGB -> XYZ (D65).
RGB2XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
# White-balance gain ranges of Brooks et al. 2019 (green gain is 1).
RED_GAIN_RANGE = (1.9, 2.4)
BLUE_GAIN_RANGE = (1.5, 1.9)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def noise_params(iso: float) -> tuple[np.ndarray, np.ndarray]:
    """(beta1, beta2), each shape (4,) in CFA order G, R, B, G (GRBG raster), for one ISO.

    Piecewise linear in ISO per channel through the calibration points, extrapolated linearly
    from the first / last segment outside [1200, 3199]. Values are returned as computed; the
    variance they give is clamped at >= 0 where it is used.
    """
    iso = float(iso)
    if not math.isfinite(iso) or iso <= 0:
        raise ValueError(f"ISO must be a positive number, got {iso!r}")
    xs = CALIBRATION_ISO
    seg = int(np.clip(np.searchsorted(xs, iso, side="right") - 1, 0, len(xs) - 2))
    t = (iso - xs[seg]) / (xs[seg + 1] - xs[seg])
    beta1 = CALIBRATION_BETA1[seg] + t * (CALIBRATION_BETA1[seg + 1] - CALIBRATION_BETA1[seg])
    beta2 = CALIBRATION_BETA2[seg] + t * (CALIBRATION_BETA2[seg + 1] - CALIBRATION_BETA2[seg])
    return beta1, beta2


def sample_camera_raw_params(
    rng: np.random.Generator, iso_range: tuple[float, float], scale_choices: list[int]
) -> dict:
    """Draw one image's parameters; the result is JSON-serialisable and fully determines the
    degradation together with the image's noise generator.

    Keys: ``iso`` (uniform in ``iso_range``), ``scale`` (uniform choice), ``ccm_weights``
    (convex weights over ``XYZ2CAMS``), ``rgb2cam`` (3x3, linear sRGB -> camera RGB, rows sum
    to 1), ``wb_gains`` ([red, 1.0, blue], camera-RGB white-balance gains).
    """
    lo, hi = (float(v) for v in iso_range)
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"iso_range must satisfy 0 < low <= high, got {iso_range!r}")
    scales = [int(s) for s in scale_choices]
    if not scales or any(s < 1 or s != float(c) for s, c in zip(scales, scale_choices)):
        raise ValueError(f"scale_choices must be a non-empty list of integers >= 1, got {scale_choices!r}")
    iso = float(rng.uniform(lo, hi)) if hi > lo else lo
    scale = int(scales[int(rng.integers(len(scales)))])
    weights = rng.uniform(1e-8, 1.0, size=len(XYZ2CAMS))
    weights = weights / weights.sum()
    xyz2cam = np.tensordot(weights, XYZ2CAMS, axes=1)
    rgb2cam = xyz2cam @ RGB2XYZ
    rgb2cam = rgb2cam / rgb2cam.sum(axis=1, keepdims=True)
    red = float(rng.uniform(*RED_GAIN_RANGE))
    blue = float(rng.uniform(*BLUE_GAIN_RANGE))
    return {
        "iso": iso,
        "scale": scale,
        "ccm_weights": [float(w) for w in weights],
        "rgb2cam": [[float(v) for v in row] for row in rgb2cam],
        "wb_gains": [red, 1.0, blue],
    }


# --------------------------------------------------------------------------------------------
# ISP pieces (all batched: images are (B, C, H, W))
# --------------------------------------------------------------------------------------------


def _per_image(value, batch: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A (shape) or (B, *shape) array-like -> (B, *shape) tensor of like's dtype/device."""
    t = torch.as_tensor(np.asarray(value, dtype=np.float64) if not torch.is_tensor(value) else value)
    t = t.to(device=like.device, dtype=like.dtype)
    if t.shape == shape:
        t = t.expand(batch, *shape)
    if tuple(t.shape) != (batch, *shape):
        raise ValueError(f"expected shape {shape} or {(batch, *shape)}, got {tuple(t.shape)}")
    return t


def _apply_matrix(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """out[b, i] = m[b, i, 0] * x[b, 0] + m[b, i, 1] * x[b, 1] + m[b, i, 2] * x[b, 2] for x (B, 3, H, W),
    m (B, 3, 3), summed in that order (no matmul/reduction: the same bits for any batch or CPU)."""
    return torch.cat([weighted_channels(x, m[:, i, :, None, None, None].unbind(1), 1) for i in range(3)], dim=1)


def _inverse(m: torch.Tensor) -> torch.Tensor:
    """Inverse of each matrix on its own in float64 (a batched LAPACK call need not round the same for
    every batch size), back to m's dtype and device."""
    m64 = m.detach().to("cpu", torch.float64)
    return torch.stack([torch.linalg.inv(mi) for mi in m64]).to(device=m.device, dtype=m.dtype)


def _gamma(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x ** exponent per image: pow is not exactly rounded, and which elements fall in a vectorised
    loop's scalar tail depends on the tensor's size."""
    return each_image(lambda xi: xi**exponent, x)


def unprocess(images: torch.Tensor, rgb2cam, wb_gains) -> torch.Tensor:
    """ISP^-1: sRGB [0, 1] -> linear camera RGB (white-balance removed), same shape.

    rgb2cam: (3, 3) or (B, 3, 3); wb_gains: (3,) or (B, 3). No clipping: values of saturated
    colours may leave [0, 1] slightly; the sensor clip happens in DN after the noise.
    """
    b = images.shape[0]
    m = _per_image(rgb2cam, b, (3, 3), images)
    g = _per_image(wb_gains, b, (3,), images)
    lin = _gamma(images.clamp(0.0, 1.0), GAMMA)
    cam = _apply_matrix(lin, m)
    return cam / g[:, :, None, None]


def process(raw_rgb: torch.Tensor, rgb2cam, wb_gains) -> torch.Tensor:
    """ISP: linear camera RGB -> sRGB [0, 1] (WB gains, inverse of rgb2cam, clip, gamma 1/2.2)."""
    b = raw_rgb.shape[0]
    m = _per_image(rgb2cam, b, (3, 3), raw_rgb)
    g = _per_image(wb_gains, b, (3,), raw_rgb)
    balanced = raw_rgb * g[:, :, None, None]
    lin = _apply_matrix(balanced, _inverse(m))
    return _gamma(lin.clamp(0.0, 1.0), 1.0 / GAMMA)


def cfa_channel_index(height: int, width: int, device=None) -> torch.Tensor:
    """(H, W) long map of the GRBG CFA channel at each site: 0 = G(R row), 1 = R, 2 = B, 3 = G(B row)."""
    rows = torch.arange(height, device=device) % 2
    cols = torch.arange(width, device=device) % 2
    return rows[:, None] * 2 + cols[None, :]


def mosaic_grbg(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) Bayer GRBG: row 0 = G R G R ..., row 1 = B G B G ..."""
    idx = cfa_channel_index(rgb.shape[-2], rgb.shape[-1], rgb.device)
    colour = torch.tensor([1, 0, 2, 1], device=rgb.device)[idx]  # CFA channel -> RGB plane
    return torch.gather(rgb, 1, colour.expand(rgb.shape[0], 1, *idx.shape))


def raw_to_dn(raw: torch.Tensor) -> torch.Tensor:
    """Normalised RAW (0 = black, 1 = white) -> 10-bit DN (black 64, white 1023). No clipping."""
    return raw * (WHITE_LEVEL - BLACK_LEVEL) + BLACK_LEVEL


def dn_to_raw(dn: torch.Tensor) -> torch.Tensor:
    """Subtract the black level and normalise (values below black stay negative)."""
    return (dn - BLACK_LEVEL) / (WHITE_LEVEL - BLACK_LEVEL)


def add_heteroscedastic_noise(
    bayer_dn: torch.Tensor, beta1, beta2, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """x + N(0, max(beta1[c]*x + beta2[c], 0)) per CFA channel c, clipped to [0, WHITE_LEVEL].

    bayer_dn: (B, 1, H, W) GRBG mosaic in DN; beta1, beta2: (4,) or (B, 4) in CFA order;
    generators: one torch.Generator per image (may live on another device than the images).
    """
    b, c, h, w = bayer_dn.shape
    if c != 1:
        raise ValueError(f"expected a (B, 1, H, W) Bayer mosaic, got {tuple(bayer_dn.shape)}")
    if len(generators) != b:
        raise ValueError(f"need one generator per image: {len(generators)} for a batch of {b}")
    b1 = _per_image(beta1, b, (4,), bayer_dn)
    b2 = _per_image(beta2, b, (4,), bayer_dn)
    idx = cfa_channel_index(h, w, bayer_dn.device)
    var = (b1[:, idx] * bayer_dn[:, 0] + b2[:, idx]).clamp_min(0.0).unsqueeze(1)
    noise = torch.stack(
        [torch.randn((1, h, w), generator=g, device=g.device, dtype=torch.float32) for g in generators]
    ).to(device=bayer_dn.device, dtype=bayer_dn.dtype)
    return (bayer_dn + var.sqrt() * noise).clamp(0.0, WHITE_LEVEL)


def _pad2_cfa(x: torch.Tensor) -> torch.Tensor:
    # Two reflect pads of one pixel = mirror without repeating the edge, which keeps the Bayer
    # parity of every padded site (index -k maps to +k); needs H, W >= 2.
    return F.pad(F.pad(x, (1, 1, 1, 1), mode="reflect"), (1, 1, 1, 1), mode="reflect")


def demosaic(bayer: torch.Tensor, method: str = "mhc") -> torch.Tensor:
    """(B, 1, H, W) GRBG mosaic -> (B, 3, H, W) RGB.

    ``method="mhc"``: Malvar, He & Cutler (ICASSP 2004) gradient-corrected bilinear
    interpolation; ``"bilinear"``: plain bilinear. Stand-ins for DemosaicNet (weights not
    available offline). Implemented with shifted views (element-wise, batch-size independent).
    """
    if bayer.dim() != 4 or bayer.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, H, W) Bayer mosaic, got {tuple(bayer.shape)}")
    h, w = bayer.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"a Bayer mosaic needs at least 2x2 pixels, got {h}x{w}")
    p = _pad2_cfa(bayer)

    def s(dy: int, dx: int) -> torch.Tensor:
        return p[..., 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]

    c = s(0, 0)
    cross1 = s(-1, 0) + s(1, 0) + s(0, -1) + s(0, 1)
    diag1 = s(-1, -1) + s(-1, 1) + s(1, -1) + s(1, 1)
    horiz1, vert1 = s(0, -1) + s(0, 1), s(-1, 0) + s(1, 0)
    if method == "mhc":
        horiz2, vert2 = s(0, -2) + s(0, 2), s(-2, 0) + s(2, 0)
        cross2 = horiz2 + vert2
        g_at_rb = (4 * c + 2 * cross1 - cross2) / 8
        # At a G site: the other colour sits left/right (k_h) or above/below (k_v).
        k_h = (5 * c + 4 * horiz1 - horiz2 - diag1 + 0.5 * vert2) / 8
        k_v = (5 * c + 4 * vert1 - vert2 - diag1 + 0.5 * horiz2) / 8
        # At an R (B) site: B (R) sits on the diagonals.
        k_d = (6 * c + 2 * diag1 - 1.5 * cross2) / 8
    elif method == "bilinear":
        g_at_rb = cross1 / 4
        k_h, k_v, k_d = horiz1 / 2, vert1 / 2, diag1 / 4
    else:
        raise ValueError(f"unknown demosaic method {method!r} (use 'mhc' or 'bilinear')")
    idx = cfa_channel_index(h, w, bayer.device)
    is_gr, is_r, is_b, is_gb = (idx == 0), (idx == 1), (idx == 2), (idx == 3)
    red = torch.where(is_r, c, torch.where(is_gr, k_h, torch.where(is_gb, k_v, k_d)))
    green = torch.where(is_r | is_b, g_at_rb, c)
    blue = torch.where(is_b, c, torch.where(is_gb, k_h, torch.where(is_gr, k_v, k_d)))
    return torch.cat([red, green, blue], dim=1)


def lowres_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """Size after ↓r: round(H / r), round(W / r), at least 2x2 (one full Bayer cell)."""
    return max(2, int(math.floor(height / scale + 0.5))), max(2, int(math.floor(width / scale + 0.5)))


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area (box) resampling: overlap of each input pixel with each
    output pixel's footprint, normalised (cv2.INTER_AREA for downscaling)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / (n_in / n_out)


def area_downsample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-interpolation downsampling (cv2.INTER_AREA) of (B, C, H, W) to ``size``."""
    h_in, w_in = x.shape[-2:]
    h, w = size
    if (h, w) == (h_in, w_in):
        return x
    if h > h_in or w > w_in:
        raise ValueError(f"area_downsample only shrinks: {h_in}x{w_in} -> {h}x{w}")
    if h_in % h == 0 and w_in % w == 0:
        return each_image(lambda xi: F.avg_pool2d(xi, kernel_size=(h_in // h, w_in // w)), x)
    ah = torch.as_tensor(_area_matrix(h_in, h), device=x.device, dtype=x.dtype)
    aw = torch.as_tensor(_area_matrix(w_in, w), device=x.device, dtype=x.dtype)
    # One small matmul pair per image, so the result does not depend on the batch size.
    return torch.stack([ah @ xi @ aw.T for xi in x])


# --------------------------------------------------------------------------------------------
# Full degradation
# --------------------------------------------------------------------------------------------


def degrade_camera_raw(
    images: torch.Tensor, params: list[dict], generators: list[torch.Generator]
) -> torch.Tensor:
    """Apply Eq. 10 to a batch: (B, 3, H, W) float in [0, 1] -> (B, 3, H, W) in [0, 1].

    ``params[i]`` comes from :func:`sample_camera_raw_params` (keys ``iso``, ``scale``,
    ``rgb2cam``, ``wb_gains``); ``generators[i]`` drives image i's noise only. Images with
    different scales are processed in per-scale groups; the result for an image does not depend
    on the rest of the batch.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected a float tensor in [0, 1], got {images.dtype}")
    bsz, _, height, width = images.shape
    if len(params) != bsz or len(generators) != bsz:
        raise ValueError(f"need one params dict and one generator per image: batch {bsz}, "
                         f"{len(params)} params, {len(generators)} generators")
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    x = images.to(work_dtype)

    scales, rgb2cams, gains, beta1s, beta2s = [], [], [], [], []
    for i, p in enumerate(params):
        try:
            scale = p["scale"]
            if int(scale) != scale or int(scale) < 1:
                raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
            m = np.asarray(p["rgb2cam"], dtype=np.float64)
            g = np.asarray(p["wb_gains"], dtype=np.float64)
            if m.shape != (3, 3) or g.shape != (3,) or not (g > 0).all():
                raise ValueError("rgb2cam must be 3x3 and wb_gains three positive numbers")
            b1, b2 = noise_params(p["iso"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad camera-RAW params for image {i}: {e}") from None
        scales.append(int(scale))
        rgb2cams.append(m)
        gains.append(g)
        beta1s.append(b1)
        beta2s.append(b2)

    rgb2cam = torch.as_tensor(np.stack(rgb2cams), device=x.device, dtype=work_dtype)
    wb = torch.as_tensor(np.stack(gains), device=x.device, dtype=work_dtype)
    beta1 = torch.as_tensor(np.stack(beta1s), device=x.device, dtype=work_dtype)
    beta2 = torch.as_tensor(np.stack(beta2s), device=x.device, dtype=work_dtype)

    raw_full = unprocess(x, rgb2cam, wb)  # code order: ISP^-1 before the downsampling
    out = torch.empty_like(x)
    for scale in sorted(set(scales)):
        idx = [i for i, s in enumerate(scales) if s == scale]
        sel = torch.tensor(idx, device=x.device)
        size = lowres_size(height, width, scale)
        raw = mosaic_grbg(area_downsample(raw_full[sel], size))
        dn = add_heteroscedastic_noise(raw_to_dn(raw), beta1[sel], beta2[sel], [generators[i] for i in idx])
        srgb = process(demosaic(dn_to_raw(dn)), rgb2cam[sel], wb[sel])
        if size != (height, width):
            srgb = each_image(lambda xi: F.interpolate(xi, size=(height, width), mode="bilinear",
                                                       align_corners=False), srgb)
        out[sel] = srgb.clamp(0.0, 1.0)
    return out.to(images.dtype)
