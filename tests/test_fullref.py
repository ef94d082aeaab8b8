"""PSNR / SSIM: hand-computed cases, the TID2013 calibration values, BasicSR and pyiqa."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfr_models.metrics.fullref import psnr, rgb2gray_matlab, ssim

REPO = Path(__file__).resolve().parents[1]
TID = REPO.parent / "shared" / "calibration" / "tid2013"
NAMES = ("I03", "I04", "I06", "I08", "I19")


def _tid_folder() -> Path:
    if not (TID / "reference_scores.csv").is_file():
        pytest.fail(f"calibration data missing: {TID} (the shared TID2013 calibration folder)")
    return TID


def official(metric: str) -> tuple[np.ndarray, int]:
    """Reference values and the number of decimals they are given with."""
    with open(_tid_folder() / "reference_scores.csv", newline="") as f:
        row = {r["metric"]: r for r in csv.DictReader(f)}[metric]
    decimals = max(len(row[n].split(".")[1]) for n in NAMES)
    return np.array([float(row[n]) for n in NAMES]), decimals


def load(folder: str) -> torch.Tensor:
    ims = [np.asarray(Image.open(_tid_folder() / folder / f"{n}.bmp").convert("RGB")) for n in NAMES]
    return torch.from_numpy(np.stack(ims).copy()).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def tid() -> tuple[torch.Tensor, torch.Tensor]:
    return load("dist"), load("ref")


def random8(shape, seed, low=0, high=256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(np.float64)


def test_identical_images():
    x = torch.from_numpy(random8((3, 3, 40, 48), 0)) / 255
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    assert torch.isinf(psnr(x, x, y_channel=True)).all()
    np.testing.assert_allclose(ssim(x, x).numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(x, x, crop_border=4, y_channel=True).numpy(), 1.0, rtol=0, atol=1e-12)


def test_psnr_constant_offset_by_hand():
    a8 = random8((2, 3, 32, 32), 1, 0, 200)
    a, b = torch.from_numpy(a8) / 255, torch.from_numpy(a8 + 7) / 255
    np.testing.assert_allclose(psnr(a, b).numpy(), 20 * math.log10(255 / 7), rtol=0, atol=1e-9)
    # Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, so the Y offset is 7 * 219 / 255
    np.testing.assert_allclose(psnr(a, b, y_channel=True).numpy(), 20 * math.log10(255 / (7 * 219 / 255)),
                               rtol=0, atol=1e-9)
    # a border that differs more is cropped away
    b8 = a8 + 7
    b8[..., :3, :] = 0
    b8[..., :, -3:] = 255
    b = torch.from_numpy(b8) / 255
    assert psnr(a, b).max() < 20 * math.log10(255 / 7) - 1
    np.testing.assert_allclose(psnr(a, b, crop_border=3).numpy(), 20 * math.log10(255 / 7), rtol=0, atol=1e-9)


def test_inputs_are_quantised_to_8_bit_and_checked():
    a8 = random8((1, 3, 20, 20), 2, 10, 240)
    a = torch.from_numpy(a8) / 255
    b = a + 0.3 / 255  # below half a level: the same 8-bit image
    assert torch.isinf(psnr(a, b)).all()
    with pytest.raises(ValueError, match="differ"):
        psnr(a, a[..., :10])
    with pytest.raises(ValueError, match="crop_border"):
        ssim(a, a, crop_border=10)


def test_ssim_drops_with_noise_and_is_symmetric():
    a = torch.from_numpy(random8((1, 3, 64, 64), 3)) / 255
    a = torch.nn.functional.avg_pool2d(a, 5, 1, 2)
    noise = torch.from_numpy(np.random.default_rng(4).normal(size=a.shape)) / 255
    s = [ssim(a, (a + k * noise).clamp(0, 1)).item() for k in (2, 8, 32)]
    assert 1 > s[0] > s[1] > s[2] > 0
    b = (a + 8 * noise).clamp(0, 1)
    np.testing.assert_allclose(ssim(a, b).numpy(), ssim(b, a).numpy(), rtol=1e-12)


def test_psnr_matches_calibration(tid):
    ref, decimals = official("psnr")  # skimage peak_signal_noise_ratio on RGB uint8
    got = psnr(*tid).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.5 * 10 ** -decimals + 1e-9)


def test_ssim_matches_calibration(tid):
    ref, decimals = official("ssim")  # original SSIM MATLAB script on rgb2gray, no downsampling
    dist, refimg = tid
    got = ssim(rgb2gray_matlab(dist), rgb2gray_matlab(refimg)).numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=0.5 * 10 ** -decimals + 1e-9)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 4])
def test_matches_basicsr(tid, y_channel, crop_border):
    from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim

    dist, ref = tid
    bgr = lambda t: np.ascontiguousarray((t * 255).round().byte().permute(0, 2, 3, 1).numpy()[..., ::-1])  # noqa: E731
    d8, r8 = bgr(dist), bgr(ref)
    want_p = [calculate_psnr(d8[i], r8[i], crop_border, test_y_channel=y_channel) for i in range(len(NAMES))]
    want_s = [calculate_ssim(d8[i], r8[i], crop_border, test_y_channel=y_channel) for i in range(len(NAMES))]
    np.testing.assert_allclose(psnr(dist, ref, crop_border, y_channel).numpy(), want_p, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ssim(dist, ref, crop_border, y_channel).numpy(), want_s, rtol=0, atol=1e-6)


@pytest.mark.parametrize("y_channel", [False, True])
def test_psnr_matches_pyiqa(tid, y_channel):
    from pyiqa.archs.psnr_arch import PSNR

    dist, ref = tid
    # pyiqa's psnr / psnry with BasicSR's BT.601 Y and no epsilon in the MSE
    theirs = PSNR(test_y_channel=y_channel, crop_border=4, color_space="ycbcr", eps=0)(dist, ref)
    np.testing.assert_allclose(psnr(dist, ref, 4, y_channel).numpy(), theirs.double().numpy(), rtol=0, atol=1e-4)


def test_ssim_matches_pyiqa(tid):
    from pyiqa.archs.ssim_arch import SSIM

    # pyiqa's float64 conv2d is slow on CPU: compare on 128x160 regions of the calibration pairs.
    dist, ref = (t[..., 128:256, 160:320] for t in tid)
    metric = SSIM(test_y_channel=False, crop_border=4)  # pyiqa 'ssimc': RGB, no downsampling
    # On a pair whose structure terms are all positive the two are the same computation.
    noisy = (ref + torch.from_numpy(np.random.default_rng(5).normal(0, 2 / 255, ref.shape)).float()).clamp(0, 1)
    np.testing.assert_allclose(ssim(noisy, ref, 4).numpy(), metric(noisy, ref).double().numpy(), rtol=0, atol=1e-6)
    # pyiqa clamps the contrast-structure map at 0 (F.relu); BasicSR and the MATLAB script do not, so on
    # the strongly distorted TID pairs pyiqa is up to ~1e-3 higher.
    ours, theirs = ssim(dist, ref, 4).numpy(), metric(dist, ref).double().numpy()
    assert np.all(theirs >= ours - 1e-6) and np.abs(ours - theirs).max() < 2e-3
