"""IDM's conditional restorer: the sampler against cases derived by hand, the model folder, training, acceptance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bfr_models.diffusion.schedule import DDPMSchedule
from bfr_models.idm import (AcceptanceConfig, IDMConfig, IDMError, IDMTrainConfig, idm_sample, idm_timesteps,
                            idm_unet, judge, load_idm, save_idm, train_idm)

TINY = IDMConfig(crop=32, channels=(16, 32), layers_per_block=1, attention=(16,), norm_groups=8)


def test_timesteps_are_the_papers_even_ten_and_their_gammas_match_the_spec():
    ts = idm_timesteps(1000, 10)
    assert ts == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]  # paper t = 1000, 900, ..., 100
    abar = DDPMSchedule.linear(1000).alphas_cumprod
    # spec §2.3: sqrt(gamma_t) at t = 1000, 900, ..., 100 under linear betas 1e-4..0.02
    expected = [0.006, 0.017, 0.039, 0.083, 0.161, 0.280, 0.442, 0.630, 0.812, 0.947]
    assert np.round(np.sqrt(abar[ts]), 3).tolist() == expected


def test_oracle_x0_model_recovers_x0_and_deterministic_variance_free_path():
    schedule = DDPMSchedule.linear(1000)
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    oracle = lambda x_t, cond, t: x0  # noqa: E731
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = idm_sample(oracle, torch.zeros_like(x0), schedule, gens, steps=10)
    # the last step has gamma_s = 1, so its mean is x̂0 exactly
    assert torch.allclose(out, x0, atol=1e-5)


def test_one_step_mean_is_the_posterior_mean_and_variances_as_derived():
    """With S = 1 from t: x = mu = x̂0. With S = 2, check the intermediate against q(x_s | x_t, x̂0) by hand."""
    schedule = DDPMSchedule.linear(1000)
    ts = idm_timesteps(1000, 2)  # 999, 499
    g_t, g_s = schedule.alphas_cumprod[ts[0]], schedule.alphas_cumprod[ts[1]]
    x0 = torch.full((1, 3, 4, 4), 0.3)
    seen = []

    def model(x_t, cond, t):
        seen.append(x_t.clone())
        return x0

    gen = torch.Generator().manual_seed(0)
    idm_sample(model, torch.zeros_like(x0), schedule, [gen], steps=2, variance="posterior")
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn((3, 4, 4), generator=gen)[None]
    z = torch.randn((3, 4, 4), generator=gen)[None]
    a = g_t / g_s
    coef_x0 = np.sqrt(g_s) * (1 - a) / (1 - g_t)      # DDPM posterior mean coefficients
    coef_xt = np.sqrt(a) * (1 - g_s) / (1 - g_t)
    var = (1 - g_s) / (1 - g_t) * (1 - a)
    expected = coef_x0 * x0 + coef_xt * x_T + np.sqrt(var) * z
    assert torch.allclose(seen[1], expected.float(), atol=1e-5)


def test_image_alone_equals_image_in_a_batch():
    torch.manual_seed(0)
    unet = idm_unet(TINY).eval()
    call = lambda x, c, t: unet(torch.cat([x, c], 1), t).sample  # noqa: E731
    cond = torch.rand(3, 3, 32, 32) * 2 - 1
    schedule = TINY.schedule()
    batch = idm_sample(call, cond, schedule, [torch.Generator().manual_seed(s) for s in (5, 6, 7)], steps=4)
    alone = idm_sample(call, cond[1:2], schedule, [torch.Generator().manual_seed(6)], steps=4)
    assert torch.allclose(batch[1:2], alone, atol=1e-5)


def test_config_is_checked_and_default_is_the_specs_unet():
    with pytest.raises(IDMError, match="attention"):
        IDMConfig(crop=64, channels=(32, 64), attention=(8,), norm_groups=8)
    unet = idm_unet(IDMConfig())
    assert unet.config.in_channels == 6 and unet.config.out_channels == 3
    n = sum(p.numel() for p in unet.parameters()) / 1e6
    assert 100 < n < 140, n  # the spec's DDPM-style suggestion is 118.9M (paper: 120M)


def test_model_folder_round_trip_and_corruption(tmp_path):
    unet = idm_unet(TINY)
    uri = save_idm(unet, TINY, str(tmp_path / "m"), source={"round": 1})
    model = load_idm(uri)
    assert model.config == TINY and model.describe()["round"] == 1
    weights = tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IDMError, match="sha256"):
        load_idm(uri)
    with pytest.raises(IDMError, match="no idm.json"):
        load_idm(str(tmp_path))


def test_training_lowers_the_loss_and_resumes(tmp_path):
    torch.manual_seed(0)
    faces = torch.rand(4, 3, 40, 40)
    cfg = IDMTrainConfig(iters=6, batch_size=2, warmup=2, checkpoint_every=3, preset="idm")
    losses = []
    uri = train_idm(faces, TINY, cfg, str(tmp_path / "a"), on_step=lambda s, l: losses.append(l))
    assert len(losses) == 6 and load_idm(uri).meta["source"]["step"] == 6
    # a second call with the same folder resumes at the end: no step is repeated
    again = []
    train_idm(faces, TINY, cfg, str(tmp_path / "a"), on_step=lambda s, l: again.append(l))
    assert again == []
    with pytest.raises(IDMError, match="different config"):
        train_idm(faces, TINY, IDMTrainConfig(iters=7, batch_size=2, checkpoint_every=3), str(tmp_path / "a"))


def test_acceptance_rules():
    x = torch.rand(3, 3, 192, 192)
    x_star = torch.stack([x[0], x[1] * 0.5, x[2]])  # image 1: its low band changes a lot

    def niqe(batch):  # x* better for images 0 and 1, worse for image 2
        return torch.tensor([5.0, 5.0, 5.0]) if batch is x else torch.tensor([4.0, 4.0, 5.5])

    recs = judge(x, x_star, AcceptanceConfig(), niqe=niqe)
    assert [r["accepted"] for r in recs] == [True, False, False]
    assert recs[0]["reasons"] is None and recs[0]["niqe_after"] == 4.0
    assert "low-pass PSNR" in recs[1]["reasons"] and "NIQE not improved" in recs[2]["reasons"]
    small = judge(x[:1, :, :64, :64], x[:1, :, :64, :64], AcceptanceConfig(), niqe=None)
    assert small[0]["accepted"] is False and "NIQE undefined" in small[0]["reasons"]
