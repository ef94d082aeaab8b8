"""Kernels and batched degradation operators, each checked against a hand-derived value or an
independent implementation (BasicSR, OpenCV, PIL)."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from bfr_models.degradations import kernels as K
from bfr_models.degradations import ops
from tests.conftest import face_like


def _face_batch(n: int = 4, size: int = 64) -> torch.Tensor:
    return torch.stack([torch.from_numpy(face_like(i, size).copy()).permute(2, 0, 1) for i in range(n)]).float() / 255


def _gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _offsets(size: int):
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    return x, y  # x = column offset, y = row offset


def _covariance(kernel: np.ndarray) -> np.ndarray:
    x, y = _offsets(kernel.shape[0])
    mx, my = (kernel * x).sum(), (kernel * y).sum()
    cxx = (kernel * (x - mx) ** 2).sum()
    cyy = (kernel * (y - my) ** 2).sum()
    cxy = (kernel * (x - mx) * (y - my)).sum()
    return np.array([[cxx, cxy], [cxy, cyy]])


# ------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("kernel_type", K.KERNEL_TYPES)
def test_every_kernel_type_is_drawn_as_plain_values_and_sums_to_one(kernel_type):
    params = K.random_kernel_params(np.random.default_rng(3), [kernel_type], [1.0], 21)
    assert json.loads(json.dumps(params)) == params  # recorded in the manifest as they are
    kernel = K.kernel_from_params(**params)
    assert kernel.shape == (21, 21) and kernel.min() >= 0
    assert math.isclose(kernel.sum(), 1.0, rel_tol=1e-12)
    assert params["kernel_type"] == kernel_type and params["kernel_size"] == 21
    assert (params["beta"] is None) == (kernel_type in ("iso", "aniso"))
    if not kernel_type.endswith("aniso"):
        assert params["sigma_y"] == params["sigma_x"] and params["rotation"] == 0.0


def test_iso_kernel_covariance_is_sigma_squared_identity():
    for sigma in (1.5, 2.5, 4.0):  # small enough vs 41 taps that truncation is negligible
        cov = _covariance(K.gaussian_kernel(41, sigma, sigma, 0.0))
        np.testing.assert_allclose(cov, sigma**2 * np.eye(2), rtol=1e-4, atol=1e-9)


def test_aniso_kernel_covariance_is_rotated_diagonal():
    sx, sy, theta = 4.0, 1.5, 0.6
    c, s = math.cos(theta), math.sin(theta)
    # typed from R diag(sx^2, sy^2) R^T, R = [[c, -s], [s, c]] acting on (x, y)
    expected = np.array([[c * c * sx**2 + s * s * sy**2, c * s * (sx**2 - sy**2)],
                         [c * s * (sx**2 - sy**2), s * s * sx**2 + c * c * sy**2]])
    np.testing.assert_allclose(_covariance(K.gaussian_kernel(41, sx, sy, theta)), expected, rtol=1e-4, atol=1e-9)
    # a quarter turn swaps the axes
    np.testing.assert_allclose(_covariance(K.gaussian_kernel(41, sx, sy, math.pi / 2)),
                               np.diag([sy**2, sx**2]), rtol=1e-4, atol=1e-8)


def test_generalized_beta_one_is_the_gaussian_and_plateau_halves_at_one_sigma():
    # BasicSR's parametrisation: exp(-0.5 q^beta) with q the squared Mahalanobis distance, so the
    # Gaussian is beta = 1 (beta = 2 would be the Gaussian only if beta acted on the distance).
    g = K.gaussian_kernel(21, 2.0, 3.0, 0.4)
    np.testing.assert_allclose(K.generalized_gaussian_kernel(21, 2.0, 3.0, 0.4, 1.0), g, rtol=1e-12)
    assert not np.allclose(K.generalized_gaussian_kernel(21, 2.0, 3.0, 0.4, 2.0), g, atol=1e-4)
    c = 10  # centre of 21 taps; the pixel (x = 3, y = 0) is at q = 1 for sigma 3
    gen = K.generalized_gaussian_kernel(21, 3.0, 3.0, 0.0, 2.5)
    assert math.isclose(gen[c, c + 3] / gen[c, c], math.exp(-0.5), rel_tol=1e-12)  # q^beta = 1
    assert math.isclose(gen[c, c + 6] / gen[c, c], math.exp(-0.5 * 4**2.5), rel_tol=1e-9)  # q = 4
    plateau = K.plateau_kernel(21, 3.0, 3.0, 0.0, 2.5)
    assert math.isclose(plateau[c, c + 3] / plateau[c, c], 0.5, rel_tol=1e-12)  # 1 / (1 + 1)
    assert math.isclose(plateau[c + 6, c] / plateau[c, c], 1 / (1 + 4**2.5), rel_tol=1e-12)


def test_kernels_equal_basicsr_for_the_same_parameters():
    from basicsr.data import degradations as bd

    for size, sx, sy, theta, beta in [(41, 2.3, 2.3, 0.0, 0.7), (41, 3.1, 1.2, 0.9, 2.5), (21, 0.6, 4.0, -2.0, 1.5)]:
        np.testing.assert_allclose(K.gaussian_kernel(size, sx, sx, 0.0),
                                   bd.bivariate_Gaussian(size, sx, sy, theta, isotropic=True), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(K.gaussian_kernel(size, sx, sy, theta),
                                   bd.bivariate_Gaussian(size, sx, sy, theta, isotropic=False), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(K.generalized_gaussian_kernel(size, sx, sy, theta, beta),
                                   bd.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=False),
                                   rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(K.plateau_kernel(size, sx, sx, 0.0, beta),
                                   bd.bivariate_plateau(size, sx, sy, theta, beta, isotropic=True), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(K.plateau_kernel(size, sx, sy, theta, beta),
                                   bd.bivariate_plateau(size, sx, sy, theta, beta, isotropic=False), rtol=1e-10, atol=1e-15)


def test_random_kernel_params_are_seeded_and_follow_kernel_prob():
    draw = lambda seed: K.random_kernel_params(np.random.default_rng(seed), ["iso", "aniso"], [0.2, 0.8], 41,
                                               (0.1, 10), (0.1, 10))
    assert draw(5) == draw(5) and draw(5) != draw(6)
    rng = np.random.default_rng(0)
    types = [K.random_kernel_params(rng, ["iso", "aniso"], [0.2, 0.8], 5, (0.1, 10), (0.1, 10))["kernel_type"]
             for _ in range(2000)]
    assert abs(types.count("iso") / 2000 - 0.2) < 0.03  # 4 standard errors
    params = [K.random_kernel_params(rng, ["plateau_aniso"], [1.0], 5, (1, 2), (3, 4), (0, 1), betap_range=(0.5, 2))
              for _ in range(300)]
    assert all(1 <= p["sigma_x"] <= 2 and 3 <= p["sigma_y"] <= 4 and 0 <= p["rotation"] <= 1 for p in params)
    betas = np.array([p["beta"] for p in params])
    assert betas.min() >= 0.5 and betas.max() <= 2 and 0.35 < (betas < 1).mean() < 0.65  # half below 1


# --------------------------------------------------------------------------------- blur


def test_blur_of_an_image_smaller_than_the_kernel_reflects_like_opencv():
    images = torch.rand(2, 3, 12, 9, generator=torch.Generator().manual_seed(0))
    kernels = np.stack([K.gaussian_kernel(41, 6.0, 2.0, 0.3), K.gaussian_kernel(41, 1.0, 1.0, 0.0)])
    out = ops.blur(images, kernels)
    for i in range(2):
        ref = cv2.filter2D(images[i].permute(1, 2, 0).numpy(), -1, kernels[i])
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=2e-6)


def test_blur_of_a_constant_image_is_the_constant():
    kernels = np.stack([K.gaussian_kernel(41, 3.0, 1.0, 0.5), K.plateau_kernel(41, 5.0, 2.0, 1.0, 1.5)])
    flat = torch.full((2, 3, 30, 50), 0.3)  # smaller than the kernel: borders reflect several times
    torch.testing.assert_close(ops.blur(flat, kernels), flat, atol=1e-6, rtol=0)


def test_blur_of_a_delta_is_the_flipped_kernel():
    kernel = np.random.default_rng(1).random((9, 9))
    kernel /= kernel.sum()
    img = torch.zeros(1, 3, 64, 64)
    img[0, :, 30, 20] = 1.0
    out = ops.blur(img, kernel[None])[0]
    expected = torch.from_numpy(kernel[::-1, ::-1].copy()).float()
    for ch in range(3):  # filter2D is a correlation: a delta spreads into the flipped kernel
        torch.testing.assert_close(out[ch, 26:35, 16:25], expected, atol=1e-6, rtol=0)
    assert out.sum().item() == pytest.approx(3.0, abs=1e-4)


def test_blur_equals_cv2_filter2d_with_reflect101_borders_and_is_batch_independent():
    images = torch.rand(4, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(2)
    kernels = rng.random((4, 41, 41))  # asymmetric, so a convolution (flipped) would not pass
    kernels /= kernels.sum((1, 2), keepdims=True)
    out = ops.blur(images, kernels)
    for i in range(4):
        ref = cv2.filter2D(images[i].permute(1, 2, 0).numpy(), -1, kernels[i])  # BORDER_REFLECT_101 default
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), ref, atol=2e-6)
        # Exact equality is guaranteed: blur runs one FFT per image, the same calls alone or batched.
        assert torch.equal(ops.blur(images[i : i + 1], kernels[i : i + 1])[0], out[i])


# ------------------------------------------------------------------------------- resize


@pytest.mark.parametrize("size", [(16, 16), (13, 21), (8, 8), (80, 77)])
def test_bilinear_resize_equals_cv2_inter_linear(size):
    img = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    ours = ops.resize(torch.from_numpy(img).permute(2, 0, 1)[None], size, "bilinear")[0].permute(1, 2, 0).numpy()
    ref = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resize_gives_the_same_bits_whatever_the_thread_count(mode):
    """The thread rule gives a shard 1 thread or all the cores, by --workers and the machine: the bytes of a
    degraded image must not depend on it (torch's upsample_bilinear2d rounded differently per thread split)."""
    img = torch.rand(2, 3, 61, 64, generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        out = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out[n] = [ops.resize(img, size, mode) for size in ((256, 250), (31, 17))]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for n in (2, 3) for a, b in zip(out[1], out[n]))


def test_bicubic_resize_is_antialiased_keys_half_like_pil_and_matlab_inside():
    from basicsr.utils.matlab_functions import imresize

    img = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    ours = ops.resize(torch.from_numpy(img).permute(2, 0, 1)[None], (16, 16), "bicubic")[0].permute(1, 2, 0).numpy()
    pil = np.stack([np.asarray(Image.fromarray(img[..., c]).resize((16, 16), Image.BICUBIC)) for c in range(3)], -1)
    np.testing.assert_allclose(ours, pil, atol=1e-5)
    matlab = imresize(img, 0.25)  # antialiased, a = -0.5, mirrored borders
    np.testing.assert_allclose(ours[2:-2, 2:-2], matlab[2:-2, 2:-2], atol=1e-5)
    assert np.abs(ours - img.reshape(16, 4, 16, 4, 3).mean((1, 3))).max() < 0.2  # a low-pass, not a decimation
    with pytest.raises(ValueError, match="bilinear, bicubic"):
        ops.resize(torch.zeros(1, 3, 8, 8), (4, 4), "area")


# -------------------------------------------------------------------------------- noise


NOISES = [ops.add_gaussian_noise, ops.add_laplace_noise, ops.add_poisson_noise]


@pytest.mark.parametrize("add_noise", NOISES)
@pytest.mark.parametrize("level", [0.5, 0.25])
def test_noise_std_on_flat_gray_is_sigma_over_255(add_noise, level):
    flat = torch.full((2, 3, 64, 64), level)
    out = add_noise(flat, [5.0, 20.0], _gens([1, 2]))
    for i, sigma in enumerate((5.0, 20.0)):
        noise = (out[i] - level).double()
        # 12288 samples: the std's standard error is < 1.5 %
        assert noise.std().item() == pytest.approx(sigma / 255, rel=0.06)
        assert abs(noise.mean().item()) < 4 * sigma / 255 / math.sqrt(noise.numel())


def test_noise_shapes_laplace_tails_and_poisson_signal_dependence():
    flat = torch.full((1, 3, 96, 96), 0.5)

    def excess_kurtosis(add_noise):
        n = (add_noise(flat, [10.0], _gens([0]))[0] - 0.5).double().flatten()
        return ((n - n.mean()) ** 4).mean().item() / n.var().item() ** 2 - 3

    assert abs(excess_kurtosis(ops.add_gaussian_noise)) < 0.3
    assert excess_kurtosis(ops.add_laplace_noise) == pytest.approx(3.0, abs=0.6)  # Laplace: 3
    # shot noise: var = x / lam, so std ratio between levels 0.64 and 0.16 is sqrt(4) = 2, and
    # the RMS over the whole image is sigma / 255
    img = torch.full((1, 3, 64, 64), 0.16)
    img[..., 32:] = 0.64
    noise = (ops.add_poisson_noise(img, [12.0], _gens([3]))[0] - img[0]).double()
    assert (noise[..., 32:].std() / noise[..., :32].std()).item() == pytest.approx(2.0, rel=0.06)
    assert noise.pow(2).mean().sqrt().item() == pytest.approx(12 / 255, rel=0.04)


@pytest.mark.parametrize("add_noise", NOISES)
def test_gray_noise_is_equal_across_channels_and_color_noise_is_not(add_noise):
    flat = torch.full((2, 3, 32, 32), 0.5)
    out = add_noise(flat, [15.0, 15.0], _gens([4, 4]), gray=[True, False])
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])
    assert not torch.equal(out[1, 0], out[1, 1])
    assert not torch.equal(out[0], flat[0])


@pytest.mark.parametrize("add_noise", NOISES)
def test_noise_is_seeded_per_image_and_batch_independent(add_noise):
    images = _face_batch(4, 32)
    sigmas = [3.0, 8.0, 13.0, 20.0]
    batch = add_noise(images, sigmas, _gens([10, 11, 12, 13]))
    for i in range(4):  # exact: noise is drawn per image and added element-wise (exactly rounded)
        assert torch.equal(add_noise(images[i : i + 1], sigmas[i : i + 1], _gens([10 + i]))[0], batch[i])
    assert not torch.equal(add_noise(images[:1], sigmas[:1], _gens([99]))[0], batch[0])
    assert batch.min() >= 0 and batch.max() <= 1  # clipped
    assert torch.equal(add_noise(images, [0.0] * 4, _gens(range(4))), images)


# --------------------------------------------------------------------------------- JPEG


def test_jpeg_quality_is_applied_and_matches_opencv():
    images = _face_batch(1, 64)
    errors = {q: (ops.jpeg(images, [q]) - images).abs().mean().item() for q in (10, 50, 95)}
    assert errors[10] > errors[50] > errors[95] > 0
    assert not torch.equal(ops.jpeg(images, [100]), ops.jpeg(images, [10]))
    rgb8 = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    _, buf = cv2.imencode(".jpg", rgb8[..., ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 37])
    expected = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255
    np.testing.assert_array_equal(ops.jpeg(images, [37])[0].permute(1, 2, 0).numpy(), expected)


def test_jpeg_passes_an_int_quality_and_refuses_floats(monkeypatch):
    seen = []
    real = cv2.imencode

    def spy(ext, img, params):
        seen.append(params)
        return real(ext, img, params)

    monkeypatch.setattr(cv2, "imencode", spy)
    ops.jpeg(_face_batch(2, 16), [np.int64(70), 35])
    assert [p[1] for p in seen] == [70, 35] and all(type(p[1]) is int for p in seen)
    with pytest.raises(TypeError, match="integer"):
        ops.jpeg(_face_batch(1, 16), [70.5])
    with pytest.raises(TypeError, match="integer"):
        ops.jpeg(_face_batch(1, 16), [101])


# ------------------------------------------------------------------------ colour, 8 bit


def test_quantize_gray_and_color_shift():
    x = torch.tensor([-0.2, 0.0, 0.5 / 255, 1.4 / 255, 0.5, 1.3]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    q = ops.quantize_8bit(x)
    assert torch.allclose(q * 255, (q * 255).round()) and q.min() == 0 and q.max() == 1
    assert q[0, 0, 0, 2].item() == 0.0 and q[0, 0, 1, 0].item() == pytest.approx(1 / 255)  # half to even, then 1.4
    rgb = torch.tensor([0.2, 0.6, 1.0]).view(1, 3, 1, 1)
    assert ops.to_grayscale(rgb).flatten().tolist() == pytest.approx([0.299 * 0.2 + 0.587 * 0.6 + 0.114] * 3)
    bgr = np.array([[[1.0, 0.6, 0.2]]], np.float32)
    assert cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[0, 0] == pytest.approx(ops.to_grayscale(rgb)[0, 0, 0, 0].item())
    shifted = ops.shift_colors(rgb, [[0.1, -0.7, 0.2]])
    assert shifted.flatten().tolist() == pytest.approx([0.3, 0.0, 1.0])


def test_bicubic_matlab_resize_is_matlab_imresize_borders_included():
    """DifBFSR's protocol resize (spec: bicubic_matlab_antialias) is MATLAB's imresize at the borders too,
    where torch/PIL's antialiased bicubic renormalises the truncated kernel instead of mirroring."""
    from basicsr.utils.matlab_functions import imresize

    from bfr_models.degradations import load_preset

    x = torch.from_numpy(face_like(3, 64)).permute(2, 0, 1)[None].double() / 255.0
    ours = ops.resize(x, (16, 16), "bicubic_matlab")[0]
    reference = imresize(x[0], 0.25, antialiasing=True)
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-6, rtol=0)
    torchs = ops.resize(x, (16, 16), "bicubic")[0]
    assert (torchs - reference).abs()[:, 0].max() > 1e-3  # the border is where the two conventions part
    assert load_preset("difbfsr-gaussian8").config["downsample"]["mode"] == "bicubic_matlab"


def test_color_adjustments_by_hand():
    red, gray = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1), torch.full((3, 1, 1), 0.4)
    # a third of a turn moves pure red onto pure green, and back again; gray has no hue to turn
    assert torch.equal(ops.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1))
    assert torch.allclose(ops.adjust_hue(ops.adjust_hue(red, 1 / 3), -1 / 3), red, atol=1e-6)
    assert torch.equal(ops.adjust_hue(gray, 0.25), gray)
    assert torch.equal(ops.adjust_brightness(torch.full((3, 1, 1), 0.8), 0.5), gray)
    assert torch.equal(ops.adjust_brightness(gray, 4.0), torch.ones(3, 1, 1))  # clipped
    # saturation 0 leaves the gray 0.2989 r + 0.587 g + 0.114 b; contrast 0 leaves that gray's mean everywhere
    assert torch.allclose(ops.adjust_saturation(red, 0.0), torch.full((3, 1, 1), 0.2989))
    two = torch.cat([red, torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)], dim=2)
    assert torch.allclose(ops.adjust_contrast(two, 0.0), torch.full((3, 1, 2), (0.2989 + 0.114) / 2))


@pytest.mark.parametrize("name,low,high", [("brightness", 0.5, 1.5), ("contrast", 0.5, 1.5),
                                           ("saturation", 0.0, 1.5), ("hue", -0.5, 0.5)])
def test_color_adjustments_equal_torchvision(name, low, high):
    """GFPGAN's colour jitter is torchvision's functions; ours are the same operations without its import.
    Contrast takes its mean in float64 (one summation order on any CPU), so it may differ in the last bit."""
    from torchvision.transforms import functional as TF

    g = torch.Generator().manual_seed(7)
    for trial in range(8):
        image = torch.rand(3, 24, 40, generator=g)
        image[:, :4] = image[:1, :4]  # gray pixels
        image[:, 4:8] = (image[:, 4:8] * 4).round() / 4  # ties between channels
        factor = low + (high - low) * trial / 7
        ours, theirs = ops.COLOR_ADJUSTMENTS[name](image, factor), getattr(TF, f"adjust_{name}")(image, factor)
        assert (ours - theirs).abs().max() <= 1e-6, (name, factor)
