"""Degradation operators on batches of images, (B, C, H, W) float tensors in [0, 1], RGB.

One function per effect. Everything runs on the images' device except JPEG (OpenCV's codec,
per image on the CPU). Random noise comes from one ``torch.Generator`` per image, so an image
gives the same result alone or inside a batch; a generator may live on another device than the
images (CPU generators give the same noise whatever device the images are on).

Noise level convention, the same for all three noise types: ``sigma`` is a standard deviation
on the 0-255 scale (BasicSR's and the BFR papers' convention for Gaussian noise; DR2's delta
for Laplace and Poisson noise is not defined by the paper, so we give it the same meaning):
  gaussian: N(0, (sigma/255)^2) per pixel;
  laplace:  Laplace with standard deviation sigma/255 (scale b = sigma / (255 sqrt 2));
  poisson:  shot noise Poisson(lam * x) / lam - x with the photon count lam chosen per image so
            that the noise's RMS over the image is sigma/255, i.e. lam = mean(x) * (255/sigma)^2
            (the variance at a pixel is x / lam). On a flat image the std is exactly sigma/255;
            darker pixels get less noise than brighter ones, as shot noise does.
"Gray" noise draws one plane and adds it to all three channels (Poisson: computed on the
BT.601 luma, as BasicSR's ``generate_poisson_noise`` does with ``cv2.COLOR_BGR2GRAY``).
Noisy images are clipped to [0, 1], as BasicSR's ``clip=True`` default.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from bfr_models.resize import matlab_resize

# cv2.COLOR_BGR2GRAY / ITU-R BT.601 luma weights, in RGB order.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def each_image(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``fn`` called on one (1, C, H, W) image at a time, results concatenated. For kernels whose
    float results may depend on how many images share a call (batched FFT plans, a vectorised
    loop's scalar tail, split points): an image's output must not depend on its companions."""
    return torch.cat([fn(images[i : i + 1]) for i in range(images.shape[0])])


def weighted_channels(images: torch.Tensor, weights, dim: int) -> torch.Tensor:
    """sum_k weights[k] * images.select(dim, k), added in the fixed order k = 0, 1, 2, ... with
    element-wise operations (exactly rounded, so the same bits on any CPU and batch), not a
    reduction or matmul whose summation order is the kernel's choice. ``weights`` are numbers
    or tensors broadcastable to one channel slice; keeps ``dim`` (size 1)."""
    total = None
    for k, w in enumerate(weights):
        term = images.narrow(dim, k, 1) * w
        total = term if total is None else total + term
    return total
RESIZE_MODES = ("bilinear", "bicubic", "bicubic_matlab")


# ---------------------------------------------------------------------------------- blur


def _reflect101_indices(n: int, pad: int, device) -> torch.Tensor:
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx.remainder(period)
    return torch.where(idx >= n, period - idx, idx)


def _pad_reflect101(images: torch.Tensor, pad: int) -> torch.Tensor:
    """cv2.BORDER_REFLECT_101 (= torch 'reflect'): ... 2 1 | 0 1 2 ... n-1 | n-2 n-3 ...
    torch's reflect padding needs pad < size; past that the border keeps reflecting, as in
    OpenCV, which the index form does."""
    h, w = images.shape[-2:]
    if pad < min(h, w):
        return F.pad(images, (pad, pad, pad, pad), mode="reflect")
    padded = images.index_select(-2, _reflect101_indices(h, pad, images.device))
    return padded.index_select(-1, _reflect101_indices(w, pad, images.device))


def _fft_length(n: int) -> int:
    """The smallest 5-smooth number >= n (FFTs of such lengths are fast)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def blur(images: torch.Tensor, kernels) -> torch.Tensor:
    """Filter each image with its own kernel, exactly as ``cv2.filter2D(img, -1, kernel)``:
    correlation (not convolution) anchored at the kernel centre, BORDER_REFLECT_101 borders.

    images: (B, C, H, W); kernels: (B, k, k), k odd (numpy or tensor). The correlation is
    computed through the FFT: the same result as a grouped conv2d to ~1e-6, and 2-4x faster on
    the CPU for the 41x41 kernels of the presets at 512x512.
    """
    b, _, h, w = images.shape
    if not torch.is_tensor(kernels):
        kernels = torch.from_numpy(np.asarray(kernels))
    kernels = kernels.to(device=images.device, dtype=images.dtype)
    if kernels.dim() != 3 or kernels.shape[0] != b or kernels.shape[1] != kernels.shape[2] or kernels.shape[1] % 2 != 1:
        raise ValueError(f"need one odd square kernel per image: images {tuple(images.shape)}, "
                         f"kernels {tuple(kernels.shape)}")
    k = kernels.shape[-1]
    pad = k // 2
    padded = _pad_reflect101(images.contiguous(), pad)
    # Circular convolution with the flipped kernel over a length >= H + k - 1 equals the linear
    # one from index k - 1 on, which is exactly the correlation at the H x W output pixels.
    size = (_fft_length(h + 2 * pad), _fft_length(w + 2 * pad))
    flipped = kernels.flip(-2, -1)
    out = []
    for i in range(b):  # one FFT per image: batched FFT plans may round differently per batch size
        spectrum = torch.fft.rfft2(padded[i], s=size) * torch.fft.rfft2(flipped[i], s=size)
        out.append(torch.fft.irfft2(spectrum, s=size)[..., k - 1 : k - 1 + h, k - 1 : k - 1 + w])
    return torch.stack(out)


# -------------------------------------------------------------------------------- resize


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, H, W) to ``size`` = (height, width).

    bilinear: ``cv2.resize(..., INTER_LINEAR)``: half-pixel centres (align_corners=False), no
              antialiasing, the GFPGAN/CodeFormer/DifFace/DiffBIR convention.
    bicubic:  antialiased Keys cubic with a = -0.5 (torch ``antialias=True``), identical to PIL's
              BICUBIC and to MATLAB's ``imresize`` away from the borders (at the borders PIL/torch
              renormalise the truncated kernel where MATLAB mirrors). Our reading of DR2's
              "bicubically downsampled".
    bicubic_matlab: MATLAB's ``imresize`` bicubic exactly, borders included (symmetric mirroring;
              :func:`bfr_models.resize.matlab_resize`), the protocol DifBFSR's spec asks for
              (``bicubic_matlab_antialias``).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r} (known: {', '.join(RESIZE_MODES)})")
    size = (int(size[0]), int(size[1]))
    if tuple(images.shape[-2:]) == size:
        return images
    if mode == "bilinear":
        return _bilinear(images, size)
    if mode == "bicubic_matlab":
        return matlab_resize(images, size)  # per image plane already (bmm), batch-independent
    return each_image(lambda x: F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True),
                      images)


@lru_cache(maxsize=1024)  # a preset draws its low-res size per image: the same few hundred sizes recur
def _bilinear_taps(n_in: int, n_out: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two source indices and weights of each output index: half-pixel centres, src = (dst + 0.5) n_in /
    n_out - 0.5 clamped at 0, the second tap clamped at the last index (as cv2 INTER_LINEAR and torch)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    first = src.floor().to(torch.int64).clamp(max=n_in - 1)
    w1 = (src - first).to(dtype)
    return first.to(device), (first + 1).clamp(max=n_in - 1).to(device), (1.0 - w1).to(device), w1.to(device)


def _bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling as gathers and element-wise products and sums, along the width then the height:
    the same bits whatever torch's thread count (its upsample_bilinear2d rounds differently at the split
    points of its threads, so the output depended on the machine's cores and on --workers)."""
    (h, w), dev, dt = images.shape[-2:], images.device, images.dtype
    c0, c1, u0, u1 = _bilinear_taps(w, size[1], dev, dt)
    r0, r1, v0, v1 = _bilinear_taps(h, size[0], dev, dt)
    cols = images.index_select(-1, c0) * u0 + images.index_select(-1, c1) * u1
    return cols.index_select(-2, r0) * v0[:, None] + cols.index_select(-2, r1) * v1[:, None]


# --------------------------------------------------------------------------------- noise


def _check_per_image(images: torch.Tensor, sigmas, generators, gray) -> list[bool]:
    b = images.shape[0]
    gray = [False] * b if gray is None else [bool(g) for g in gray]
    if not (len(sigmas) == len(generators) == len(gray) == b):
        raise ValueError(f"need one sigma, generator and gray flag per image: batch {b}, {len(sigmas)} sigmas, "
                         f"{len(generators)} generators, {len(gray)} gray flags")
    return gray


def _add_unit_noise(images: torch.Tensor, sigmas, generators, gray, draw: Callable) -> torch.Tensor:
    """images + sigma/255 * (unit-variance noise from ``draw(shape, generator)``), clipped."""
    gray = _check_per_image(images, sigmas, generators, gray)
    _, c, h, w = images.shape
    noise = torch.stack([
        draw((1 if g else c, h, w), gen).to(images.device, images.dtype).expand(c, h, w) * (float(s) / 255.0)
        for s, gen, g in zip(sigmas, generators, gray)
    ])
    return (images + noise).clamp(0.0, 1.0)


def _standard_normal(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)


def _standard_laplace(shape, gen: torch.Generator) -> torch.Tensor:
    # The difference of two Exp(1) variables is Laplace(0, 1), variance 2.
    e = torch.empty((2, *shape), device=gen.device, dtype=torch.float32).exponential_(generator=gen)
    return (e[0] - e[1]) / math.sqrt(2.0)


def add_gaussian_noise(images: torch.Tensor, sigmas: Sequence[float], generators: Sequence[torch.Generator],
                       gray: Sequence[bool] | None = None) -> torch.Tensor:
    """Additive Gaussian noise, std ``sigmas[i]``/255 for image i, colour or gray per image."""
    return _add_unit_noise(images, sigmas, generators, gray, _standard_normal)


def add_laplace_noise(images: torch.Tensor, sigmas: Sequence[float], generators: Sequence[torch.Generator],
                      gray: Sequence[bool] | None = None) -> torch.Tensor:
    """Additive Laplace noise, std ``sigmas[i]``/255 for image i, colour or gray per image."""
    return _add_unit_noise(images, sigmas, generators, gray, _standard_laplace)


def add_poisson_noise(images: torch.Tensor, sigmas: Sequence[float], generators: Sequence[torch.Generator],
                      gray: Sequence[bool] | None = None) -> torch.Tensor:
    """Shot noise with RMS ``sigmas[i]``/255 over image i (see the module docstring)."""
    gray = _check_per_image(images, sigmas, generators, gray)
    c = images.shape[1]
    noises = []
    for img, s, gen, g in zip(images, sigmas, generators, gray):
        signal = (weighted_channels(img, LUMA_WEIGHTS, 0) if g else img).clamp(0.0, 1.0)
        # numpy's float64 pairwise sum: one fixed order, whatever the thread count (torch splits per thread).
        mean = float(np.mean(signal.detach().cpu().numpy(), dtype=np.float64))
        if s <= 0 or mean <= 0:  # no noise asked, or no light to make shot noise from
            noises.append(torch.zeros_like(img))
            continue
        photons = mean * (255.0 / float(s)) ** 2
        rate = (signal * photons).to(gen.device, torch.float32)
        counts = torch.poisson(rate, generator=gen).to(images.device, images.dtype)
        noises.append((counts / photons - signal).expand(c, -1, -1))
    return (images + torch.stack(noises)).clamp(0.0, 1.0)


NOISE_FUNCTIONS = {"gaussian": add_gaussian_noise, "laplace": add_laplace_noise, "poisson": add_poisson_noise}


# ---------------------------------------------------------------------------------- JPEG


def jpeg(images: torch.Tensor, qualities: Sequence[int]) -> torch.Tensor:
    """JPEG round trip through OpenCV, per image: uint8 = round(clip(x) * 255), BGR, encoded with
    IMWRITE_JPEG_QUALITY = quality (an int; OpenCV >= 4.5.4 rejects floats), decoded back."""
    if len(qualities) != images.shape[0]:
        raise ValueError(f"need one quality per image: batch {images.shape[0]}, {len(qualities)} qualities")
    for q in qualities:
        if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or not 0 <= q <= 100:
            raise TypeError(f"JPEG quality must be an integer in [0, 100], got {q!r}")
    rgb8 = (images.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for img, q in zip(rgb8, qualities):
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(q)])
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode an image of shape {img.shape}")
        out.append(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
    decoded = torch.from_numpy(np.ascontiguousarray(np.stack(out))).permute(0, 3, 1, 2)
    return decoded.to(images.device, images.dtype) / 255.0


# ------------------------------------------------------------------------ colour, 8-bit


def shift_colors(images: torch.Tensor, shifts) -> torch.Tensor:
    """GFPGAN's numpy colour jitter: add a per-channel offset (B, 3), in [0, 1] units, then clip."""
    shifts = torch.as_tensor(shifts, device=images.device, dtype=images.dtype).view(-1, images.shape[1], 1, 1)
    return (images + shifts).clamp(0.0, 1.0)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma (cv2.COLOR_BGR2GRAY) repeated on the three channels."""
    return weighted_channels(images, LUMA_WEIGHTS, 1).expand_as(images).contiguous()


# torchvision's rgb_to_grayscale weights (ITU-R 601-2, as PIL's convert("L")): GFPGAN's colour jitter uses them.
JITTER_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def _blend(image: torch.Tensor, other: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def adjust_brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_brightness on a float image: ``factor * x``, clipped."""
    return _blend(image, 0.0, factor)


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_contrast: blend with the mean of the image's gray (its weights). The mean is a
    float64 numpy sum (one fixed order on any CPU; torch's float32 mean splits per thread)."""
    gray = weighted_channels(image, JITTER_GRAY_WEIGHTS, -3)
    mean = float(np.mean(gray.detach().cpu().numpy(), dtype=np.float64))
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_saturation: blend with the image's gray."""
    return _blend(image, weighted_channels(image, JITTER_GRAY_WEIGHTS, -3), factor)


def rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, s, v) planes of a (3, H, W) RGB image in [0, 1], h in [0, 1): the hexcone model (Python's colorsys),
    on whole planes. A gray pixel has h = s = 0."""
    r, g, b = image.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    gray = chroma == 0
    s = chroma / torch.where(gray, 1.0, v)
    d = torch.where(gray, 1.0, chroma)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    h = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.fmod(h / 6.0 + 1.0, 1.0), s, v


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_hsv`: a (3, H, W) image."""
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    # (r, g, b) of each of the six 60-degree sectors, picked per pixel
    channels = [torch.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))]
    index = (sector.to(torch.int64) % 6).unsqueeze(-3)
    return torch.cat([c.gather(-3, index) for c in channels], dim=-3)


def adjust_hue(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's adjust_hue on a float image: rotate the hue by ``factor`` turns (in [-0.5, 0.5])."""
    h, s, v = rgb_to_hsv(image)
    return hsv_to_rgb((h + factor) % 1.0, s, v)


COLOR_ADJUSTMENTS = {"brightness": adjust_brightness, "contrast": adjust_contrast,
                     "saturation": adjust_saturation, "hue": adjust_hue}


def jitter_colors(image: torch.Tensor, order: Sequence[str], factors: dict) -> torch.Tensor:
    """GFPGAN's torch colour jitter on one (3, H, W) image: torchvision's adjust_brightness / contrast /
    saturation / hue (the same operations, here without importing torchvision: +0.8 s of start-up, most of
    it torch._dynamo), applied in ``order`` with ``factors[name]``."""
    for name in order:
        image = COLOR_ADJUSTMENTS[name](image, factors[name])
    return image


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """round(x * 255) clipped to [0, 255], back in [0, 1]: what an 8-bit file stores."""
    return (images * 255.0).round().clamp(0.0, 255.0) / 255.0
