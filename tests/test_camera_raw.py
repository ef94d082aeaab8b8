"""Camera-RAW degradation (unsupervised-BFR Eq. 10): each stage checked against hand-derived values."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from bfr_models.degradations import camera_raw as cr
from bfr_models.degradations.camera_raw import (
    add_heteroscedastic_noise,
    area_downsample,
    degrade_camera_raw,
    demosaic,
    mosaic_grbg,
    noise_params,
    process,
    sample_camera_raw_params,
    unprocess,
)
from tests.conftest import face_like

# Spec §3.2 calibration table, typed in again here (not imported) so a typo in the module fails.
SPEC_ISO = [1200, 1599, 2401, 3199]
SPEC_BETA1 = [[4.32, 5.06, 5.06, 4.31], [5.67, 6.76, 6.81, 5.73], [8.67, 10.36, 10.26, 8.64],
              [11.86, 13.94, 13.63, 11.85]]
SPEC_BETA2 = [[-215.7, -235.2, -241.9, -218.0], [-258.6, -285.9, -304.3, -255.5],
              [-310.7, -377.7, -398.8, -287.5], [-335.6, -444.9, -420.1, -315.9]]


def _face(seed: int, size: int = 64) -> torch.Tensor:
    return torch.from_numpy(np.array(face_like(seed, size))).permute(2, 0, 1).float().div(255.0)


def _params(seed: int, iso: float = 1600.0, scale: int = 4) -> dict:
    return sample_camera_raw_params(np.random.default_rng(seed), (iso, iso), [scale])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- parameters


def test_sample_params_json_ranges_and_reproducible():
    rng = np.random.default_rng(7)
    ps = [sample_camera_raw_params(rng, (1500.0, 3000.0), [4, 8]) for _ in range(40)]
    for p in ps:
        assert json.loads(json.dumps(p)) == p
        assert 1500.0 <= p["iso"] <= 3000.0
        assert p["scale"] in (4, 8) and isinstance(p["scale"], int)
        assert np.allclose(np.sum(p["rgb2cam"], axis=1), 1.0)  # white stays white
        assert np.isclose(sum(p["ccm_weights"]), 1.0)
        red, green, blue = p["wb_gains"]
        assert 1.9 <= red <= 2.4 and green == 1.0 and 1.5 <= blue <= 1.9
    assert {p["scale"] for p in ps} == {4, 8}
    again = np.random.default_rng(7)
    assert [sample_camera_raw_params(again, (1500.0, 3000.0), [4, 8]) for _ in range(40)] == ps
    with pytest.raises(ValueError):
        sample_camera_raw_params(rng, (3000.0, 1500.0), [4])
    with pytest.raises(ValueError):
        sample_camera_raw_params(rng, (1500.0, 3000.0), [])


def test_noise_params_calibration_points_interpolation_extrapolation():
    for iso, b1, b2 in zip(SPEC_ISO, SPEC_BETA1, SPEC_BETA2):
        beta1, beta2 = noise_params(iso)
        np.testing.assert_allclose(beta1, b1, rtol=0, atol=1e-9)
        np.testing.assert_allclose(beta2, b2, rtol=0, atol=1e-9)
    # Between 1599 and 2401: strictly between the two rows, channel by channel.
    beta1, beta2 = noise_params(2000)
    lo1, hi1 = np.array(SPEC_BETA1[1]), np.array(SPEC_BETA1[2])
    lo2, hi2 = np.array(SPEC_BETA2[1]), np.array(SPEC_BETA2[2])
    assert np.all((beta1 > lo1) & (beta1 < hi1))
    assert np.all((beta2 < lo2) & (beta2 > hi2))  # beta2 is negative and decreasing
    # Linear in between: t = (2000 - 1599) / 802.
    np.testing.assert_allclose(beta1, lo1 + (401 / 802) * (hi1 - lo1), atol=1e-9)
    # ISO 800 (the paper's "mild"): linear extrapolation of the 1200-1599 segment.
    beta1, beta2 = noise_params(800)
    np.testing.assert_allclose(beta1[0], 4.32 - 400 * (5.67 - 4.32) / 399, atol=1e-9)
    np.testing.assert_allclose(beta2[1], -235.2 - 400 * (-285.9 + 235.2) / 399, atol=1e-9)
    # ISO 4000: extrapolation of the 2401-3199 segment.
    beta1, _ = noise_params(4000)
    np.testing.assert_allclose(beta1[3], 11.85 + 801 * (11.85 - 8.64) / 798, atol=1e-9)
    with pytest.raises(ValueError):
        noise_params(0)


# ---------------------------------------------------------------- ISP pieces


def test_unprocess_gray_pixel_by_hand():
    # Gray v: de-gamma v**2.2; rgb2cam rows sum to 1 so gray stays gray; then divide by the gains.
    p = _params(3)
    v = 0.5
    x = torch.full((1, 3, 4, 4), v)
    raw = unprocess(x, p["rgb2cam"], p["wb_gains"])
    lin = v**2.2
    red, _, blue = p["wb_gains"]
    expected = torch.tensor([lin / red, lin, lin / blue])[None, :, None, None].expand_as(raw)
    torch.testing.assert_close(raw, expected, atol=1e-6, rtol=0)


def test_unprocess_then_process_is_identity():
    x = torch.stack([_face(0, 32), _face(1, 32), torch.rand(3, 32, 32, generator=_gen(0))])
    ps = [_params(s) for s in range(3)]
    m = torch.tensor([p["rgb2cam"] for p in ps])
    g = torch.tensor([p["wb_gains"] for p in ps])
    raw = unprocess(x, m, g)
    assert not torch.allclose(raw, x, atol=1e-2)  # the round trip is not trivially the identity
    # float32: gamma 1/2.2 amplifies rounding near 0, hence the looser bound; float64 is exact.
    torch.testing.assert_close(process(raw, m, g), x, atol=1e-3, rtol=0)
    x64 = x.double()
    torch.testing.assert_close(process(unprocess(x64, m, g), m, g), x64, atol=1e-7, rtol=0)


def test_mosaic_grbg_layout():
    colour = torch.tensor([0.1, 0.5, 0.9])  # R, G, B
    x = colour[None, :, None, None].expand(2, 3, 4, 6)
    bayer = mosaic_grbg(x)
    assert bayer.shape == (2, 1, 4, 6)
    # Row 0: G R G R ..., row 1: B G B G ...
    torch.testing.assert_close(bayer[0, 0, :2, :2], torch.tensor([[0.5, 0.1], [0.9, 0.5]]))
    torch.testing.assert_close(bayer[1, 0, 2:, 4:], torch.tensor([[0.5, 0.1], [0.9, 0.5]]))


@pytest.mark.parametrize("method", ["mhc", "bilinear"])
@pytest.mark.parametrize("size", [(8, 8), (7, 9), (2, 3)])
def test_mosaic_then_demosaic_of_constant_colour(method, size):
    colours = torch.tensor([[0.8, 0.3, 0.1], [0.05, 0.6, 0.95], [0.5, 0.5, 0.5]])
    x = colours[:, :, None, None].expand(3, 3, *size).contiguous()
    out = demosaic(mosaic_grbg(x), method=method)
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)  # borders included


def test_demosaic_mhc_beats_bilinear_on_a_face():
    # Sanity of the MHC kernels' signs: gradient correction must help on real content.
    x = _face(2, 64)[None]
    bayer = mosaic_grbg(x)
    err_mhc = (demosaic(bayer, "mhc") - x).abs().mean()
    err_bil = (demosaic(bayer, "bilinear") - x).abs().mean()
    assert err_mhc < err_bil < 0.05


def test_area_downsample_matches_cv2_inter_area():
    img = face_like(4, 50)[:, :38].astype(np.float32) / 255.0  # 50 x 38
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    for size in [(6, 5), (25, 19), (10, 19)]:
        ref = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        ours = area_downsample(x, size)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-5)


# ---------------------------------------------------------------- noise


def test_noise_variance_on_flat_dn_field_matches_model():
    iso, level = 1599.0, 400.0
    beta1, beta2 = noise_params(iso)
    expected = beta1 * level + beta2  # e.g. channel 0: 5.67*400 - 258.6 = 2009.4 DN^2
    dn = torch.full((2, 1, 256, 256), level, dtype=torch.float64)
    noisy = add_heteroscedastic_noise(dn, beta1, beta2, [_gen(1), _gen(2)])
    for c, (dy, dx) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # G, R, B, G sites
        samples = noisy[:, 0, dy::2, dx::2].flatten()
        assert abs(samples.mean().item() - level) < 1.0
        # 32768 samples: the relative std of the variance estimate is ~0.8%.
        assert samples.var().item() == pytest.approx(expected[c], rel=0.04)
    # Channels differ in the profile (R/B have larger beta1 than G), and it shows.
    assert noisy[:, 0, 0::2, 1::2].var() > 1.1 * noisy[:, 0, 0::2, 0::2].var()


def test_negative_variance_is_clamped_and_output_clipped():
    beta1, beta2 = noise_params(1200)
    dn = torch.full((1, 1, 16, 16), 20.0)  # 4.32*20 - 215.7 < 0 on every channel
    out = add_heteroscedastic_noise(dn, beta1, beta2, [_gen(0)])
    assert torch.equal(out, dn)
    bright = torch.full((1, 1, 16, 16), 1020.0)
    out = add_heteroscedastic_noise(bright, beta1, beta2, [_gen(0)])
    assert out.max() <= cr.WHITE_LEVEL and out.min() >= 0 and (out == cr.WHITE_LEVEL).any()


# ---------------------------------------------------------------- full degradation


def test_pipeline_without_noise_preserves_a_constant_colour(monkeypatch):
    # With the noise stage removed, a flat colour must come back exactly: this checks that
    # degrade_camera_raw wires unprocess / DN mapping / demosaic / process consistently.
    monkeypatch.setattr(cr, "add_heteroscedastic_noise", lambda dn, b1, b2, gens: dn)
    colour = torch.tensor([0.7, 0.45, 0.3])
    x = colour[None, :, None, None].expand(2, 3, 40, 40).contiguous()
    out = degrade_camera_raw(x, [_params(0, scale=1), _params(1, scale=4)], [_gen(0), _gen(1)])
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_output_size_dtype_and_range():
    x = torch.stack([_face(0, 64)[:, :50, :38], _face(1, 64)[:, :50, :38]])  # 50 x 38, odd after /8
    ps = [_params(0, scale=8), _params(1, scale=4)]
    out = degrade_camera_raw(x, ps, [_gen(0), _gen(1)])
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    assert not torch.allclose(out, x, atol=0.02)


def test_higher_iso_gives_larger_error():
    x = torch.stack([_face(s, 64) for s in range(3)])
    errors = []
    for iso in (800.0, 1600.0, 3200.0):
        ps = [_params(10 + i, iso=iso, scale=4) for i in range(3)]  # same CCM/WB, only ISO differs
        out = degrade_camera_raw(x, ps, [_gen(i) for i in range(3)])
        errors.append(((out - x) ** 2).mean().item())
    assert errors[0] < errors[1] < errors[2]


def test_determinism_and_batch_independence():
    faces = [_face(s, 48) for s in range(3)]
    ps = [_params(0, iso=2500, scale=4), _params(1, iso=1500, scale=8), _params(2, iso=3000, scale=4)]
    batch = degrade_camera_raw(torch.stack(faces), ps, [_gen(100 + i) for i in range(3)])
    again = degrade_camera_raw(torch.stack(faces), ps, [_gen(100 + i) for i in range(3)])
    assert torch.equal(batch, again)
    # Exact float equality is guaranteed by construction: every step is element-wise with exactly
    # rounded operations (the colour matrices as a fixed-order multiply-add) or runs per image (pow,
    # resampling, the inverse); test_presets checks the encoded bytes on every preset.
    for i in range(3):
        alone = degrade_camera_raw(faces[i][None], [ps[i]], [_gen(100 + i)])
        assert torch.equal(alone[0], batch[i])
    # Params that went through JSON (a manifest) give the same result.
    via_json = [json.loads(json.dumps(p)) for p in ps]
    assert torch.equal(degrade_camera_raw(torch.stack(faces), via_json, [_gen(100 + i) for i in range(3)]), batch)
    # A different seed gives different noise.
    other = degrade_camera_raw(faces[0][None], [ps[0]], [_gen(999)])
    assert not torch.equal(other[0], batch[0])


def test_bad_params_fail_clearly():
    x = _face(0, 32)[None]
    with pytest.raises(ValueError, match="image 0"):
        degrade_camera_raw(x, [{"iso": 1600, "scale": 4}], [_gen(0)])
    with pytest.raises(ValueError, match="one params dict"):
        degrade_camera_raw(x, [], [])
