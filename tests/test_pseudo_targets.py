"""Pseudo-target science: parameters and their checks, the quality checks, --auto choice, batching."""

import math

import pytest
import torch

from bfr_models.device import set_cpu_lanes
from bfr_models.diffusion.prior import PriorError, load_prior, save_prior
from bfr_models.diffusion.train import PriorTrainConfig, small_unet
from bfr_models.imageio import encode_png
from bfr_models.pseudo_targets import (Candidate, PseudoTargetError, choose, generate, grid, lowfreq_psnr,
                                       method_params, noise_sigma, validate)
from tasks.rows import to_uint8


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    torch.manual_seed(0)
    unet = small_unet(PriorTrainConfig(resolution=32, channels=(16, 32)))
    # random (not zero) output weights so the prior's predictions depend on the input
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    uri = save_prior(unet, str(tmp_path_factory.mktemp("prior")), variance_type="fixed_large")
    return load_prior(uri)


def test_defaults_follow_the_papers():
    d = method_params("dr2", tau=350)
    assert (d.N, d.tau, d.omega, d.respace) == (4, 350, 600, 100)  # omega = tau + 0.25T, DR2 code's 100 steps
    lf = method_params("lowfreq")
    assert (lf.N, lf.K, lf.L, lf.respace) == (16, 600, 360, 250)
    assert method_params("polish").n2 == 100
    assert method_params("dr2", tau=900).omega == 999  # capped at T-1


@pytest.mark.parametrize("method, given, message", [
    ("dr2", {"N": 3}, "N=3 does not divide"),
    ("dr2", {"tau": 400, "omega": 300}, "tau (400) must be smaller than omega (300)"),
    ("lowfreq", {"K": 300, "L": 360}, "L (360) must be smaller than K (300)"),
    ("dr2", {"tau": 1200}, "tau=1200 must be in 0..999"),
    ("dr2", {"tau": 100, "omega": 104, "respace": 100}, "fall on the same of 100 respaced steps"),
])
def test_bad_parameters_fail_with_one_line(method, given, message):
    with pytest.raises(PseudoTargetError) as e:
        validate(method_params(method, **given), resolution=64)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parameters_of_another_method_are_refused():
    with pytest.raises(PseudoTargetError, match="--K does not apply to method dr2"):
        method_params("dr2", K=600)
    with pytest.raises(PseudoTargetError, match="unknown method"):
        method_params("sr3")


def test_noise_sigma_recovers_known_gaussian_noise():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((2, 3, 128, 128), 0.5)
    for sigma in (5.0, 15.0):
        noisy = flat + torch.randn(flat.shape, generator=g)[:, :1].expand_as(flat) * sigma / 255.0
        est = noise_sigma(noisy)
        assert torch.allclose(est, torch.full_like(est, sigma), rtol=0.05)
    # a smooth ramp has no noise: the two Laplacians cancel linear structure exactly
    ramp = torch.linspace(0, 1, 128).view(1, 1, 1, 128).expand(1, 3, 128, 128)
    assert float(noise_sigma(ramp)) < 1e-6


def test_lowfreq_psnr_ignores_high_frequencies_only():
    x = torch.full((1, 3, 32, 32), 0.5)
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float() * 0.2 - 0.1
    assert math.isinf(float(lowfreq_psnr(x, x, 4)))
    # a checkerboard is removed by Φ_4 almost entirely, a brightness shift of 0.1 is not
    assert float(lowfreq_psnr(x + checker, x, 4)) > 40
    assert abs(float(lowfreq_psnr(x + 0.1, x, 4)) - 20.0) < 1e-3  # 10 log10(1 / 0.01)


def test_choose_best_quality_under_the_fidelity_limit():
    cands = [Candidate({"N": 4}, quality=5.0, fidelity=30), Candidate({"N": 8}, quality=4.0, fidelity=26),
             Candidate({"N": 16}, quality=3.0, fidelity=19)]
    assert choose(cands, fidelity_limit=25)[0] == 1  # N=16 scores best but drifted below the limit
    assert choose(cands, fidelity_limit=18)[0] == 2
    best, reason = choose(cands, fidelity_limit=40)
    assert best == 0 and "most faithful" in reason
    assert choose(cands, fidelity_limit=18, higher_is_better=True)[0] == 0  # MUSIQ: higher is better


def test_auto_grid_keeps_omega_following_tau():
    cands = grid("dr2", method_params("dr2"), {"N": [4, 8], "tau": [100, 300]})
    assert sorted((c.N, c.tau, c.omega) for c in cands) == [(4, 100, 350), (4, 300, 550), (8, 100, 350), (8, 300, 550)]


@pytest.mark.parametrize("method, params", [("dr2", {"N": 4, "tau": 200, "respace": 20}),
                                            ("lowfreq", {"N": 8, "K": 600, "L": 360, "respace": 25}),
                                            ("polish", {"n2": 100, "respace": 50})])
def test_an_image_alone_equals_it_inside_a_batch_of_16(tiny_prior, method, params):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(16, 3, 32, 32, generator=g)
    seeds = [[1000 + b] for b in range(16)]
    p = method_params(method, **params)
    batch = generate(p, images, tiny_prior, seeds)
    alone = generate(p, images[5:6], tiny_prior, seeds[5:6])
    assert torch.allclose(batch.images[5], alone.images[0], atol=1e-5)
    assert batch.records[5]["seed"] == 1005 and batch.records[5]["best_of"] == 1
    other_seed = generate(p, images[5:6], tiny_prior, [[7]])
    assert not torch.allclose(other_seed.images[0], alone.images[0], atol=1e-3)


@pytest.mark.parametrize("method, params, size", [("dr2", {"N": 4, "tau": 200, "respace": 20}, 32),
                                                  ("lowfreq", {"N": 8, "K": 600, "L": 360, "respace": 10}, 32),
                                                  ("polish", {"n2": 5}, 32),
                                                  ("difbfsr", {"N": 4, "respace": 10, "warmup": 1}, 8)])
def test_an_images_png_bytes_do_not_depend_on_its_batch(tiny_prior, method, params, size):
    # the user-visible contract: the same PNG bytes alone and among 2 or 4 other images, whatever the CPU's
    # kernels do with batch size (the UNet and DifBFSR's modules run per image on the CPU)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(8, 3, size, size, generator=g)
    p = method_params(method, **params)

    def png_of_image_0(rows: list[int]) -> bytes:
        out = generate(p, images[rows], tiny_prior, [[500 + r] for r in rows])
        return encode_png(to_uint8(out.images[rows.index(0)]))

    alone = png_of_image_0([0])
    assert png_of_image_0([3, 0, 5]) == alone
    assert png_of_image_0([7, 6, 1, 0, 2]) == alone
    set_cpu_lanes(2)  # a lone shard's batch, cut into one part per lane (bfr_models.device.split_on_lanes)
    try:
        assert png_of_image_0([7, 6, 1, 0, 2]) == alone
    finally:
        set_cpu_lanes(1)


def test_resize_modes_and_refusal(tiny_prior):
    images = torch.rand(2, 3, 64, 64)
    p = method_params("dr2", N=4, tau=100, respace=10)
    back = generate(p, images, tiny_prior, [[1], [2]], resize="input")
    assert back.images.shape == (2, 3, 64, 64) and back.records[0]["resize"] == {"from": [64, 64], "prior": 32, "out": [64, 64]}
    at_prior = generate(p, images, tiny_prior, [[1], [2]], resize="prior")
    assert at_prior.images.shape == (2, 3, 32, 32)
    with pytest.raises(PseudoTargetError, match="differs from the prior's resolution 32"):
        generate(p, images, tiny_prior, [[1], [2]], resize="refuse")


def test_best_of_k_keeps_a_sample_that_passes_the_limit(tiny_prior):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    p = method_params("dr2", N=4, tau=100, respace=10)
    out = generate(p, images, tiny_prior, [[1, 2, 3]] * 3, fidelity_limit=0.0)
    for rec in out.records:
        assert rec["best_of"] == 3 and rec["seed"] == [1, 2, 3][rec["sample"]]
    # the kept sample of image 0 is exactly what its seed gives alone
    single = generate(p, images[:1], tiny_prior, [[out.records[0]["seed"]]])
    assert torch.allclose(single.images[0], out.images[0], atol=1e-5) and single.records[0]["best_of"] == 1


def test_corrupt_prior_weights_are_refused(tmp_path):
    unet = small_unet(PriorTrainConfig(resolution=16, channels=(8, 16)))
    uri = save_prior(unet, str(tmp_path / "p"), variance_type="fixed_large")
    weights = tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(PriorError, match="sha256 .* but prior.json says"):
        load_prior(uri)
    with pytest.raises(PriorError, match="neither a prior folder nor a model card"):
        load_prior("no_such_prior")
