"""Diffusion schedule, low-pass filter and samplers (CPU, fast)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bfr_models.diffusion.difbfsr import DifBFSRConfig, difbfsr_sample
from bfr_models.diffusion.lowpass import lowpass
from bfr_models.resize import matlab_resize
from bfr_models.diffusion.samplers import dr2_sample, lowfreq_sample, polish_sample
from bfr_models.diffusion.schedule import DDPMSchedule, respace, space_timesteps

BASE = DDPMSchedule.linear()


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _target(B=4, C=3, H=32, W=32):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, H), torch.linspace(0, 1, W), indexing="ij")
    imgs = [0.7 * torch.sin(2 * math.pi * (xx * (b + 1) / 2 + yy / 2)).expand(C, H, W) for b in range(B)]
    return torch.stack(imgs).contiguous()


def _oracle(x0, base=BASE):
    """ε that exactly explains x_t from x0, at original timesteps; 3 or 6 channels."""
    abar = torch.from_numpy(base.alphas_cumprod)

    def eps_model(x_t, t):
        a = abar[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0[: x_t.shape[0]]) / (1 - a).sqrt()

    return eps_model


def test_linear_schedule_alpha_bar_by_hand():
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert BASE.alphas_cumprod[0] == pytest.approx(1 - 1e-4, rel=1e-12)
    prod = 1.0
    for b in betas:
        prod *= 1 - b
    assert BASE.alphas_cumprod[999] == pytest.approx(prod, rel=1e-9)
    assert BASE.betas[-1] == pytest.approx(0.02)
    # §2.4 signal levels: sqrt(abar) at t=100 (0-indexed 99..100) ~ 0.947
    assert math.sqrt(BASE.alphas_cumprod[100]) == pytest.approx(0.947, abs=2e-3)
    assert BASE.posterior_variance[0] == 0.0


@pytest.mark.parametrize("n", [100, 250])
def test_respace_keeps_alpha_bar(n):
    sp = respace(BASE, n)
    kept = np.asarray(space_timesteps(1000, n))
    assert len(sp) == n and kept[0] == 0 and kept[-1] == 999
    np.testing.assert_array_equal(sp.timestep_map, kept)
    np.testing.assert_allclose(sp.alphas_cumprod, BASE.alphas_cumprod[kept], rtol=1e-12)
    assert sp.index_for(kept[7]) == 7


def test_respace_250_matches_guided_diffusion_indices():
    sp = respace(BASE, 250)
    assert [int(sp.timestep_map[i]) for i in (150, 149, 90, 89)] == [602, 598, 361, 357]
    assert sp.index_for(600) == 150 and sp.index_for(360) == 90


def test_q_sample_then_predict_x0_roundtrip():
    x0 = _target()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for sched in (BASE, respace(BASE, 100)):
        t = torch.tensor([0, 10, 50, len(sched) - 1])
        x_t = sched.q_sample(x0, t, noise)
        torch.testing.assert_close(sched.predict_x0(x_t, t, noise), x0, atol=2e-3, rtol=0)


def test_p_mean_variance_variance_types():
    x = torch.zeros(2, 3, 8, 8)
    t = torch.tensor([5, 500])
    eps = torch.zeros_like(x)
    small = BASE.p_mean_variance(eps, x, t, "fixed_small")
    large = BASE.p_mean_variance(eps, x, t, "fixed_large")
    assert (large["variance"] >= small["variance"]).all()
    assert large["variance"][1, 0, 0, 0].item() == pytest.approx(BASE.betas[500], rel=1e-5)
    lo = BASE.p_mean_variance(torch.cat([eps, -torch.ones_like(x)], 1), x, t)
    hi = BASE.p_mean_variance(torch.cat([eps, torch.ones_like(x)], 1), x, t)
    torch.testing.assert_close(lo["log_variance"], small["log_variance"])
    torch.testing.assert_close(hi["log_variance"], large["log_variance"])
    with pytest.raises(ValueError):
        BASE.p_mean_variance(torch.zeros(2, 5, 8, 8), x, t)


def test_lowpass_constant_checkerboard_sinusoid():
    const = torch.full((2, 3, 64, 64), 0.3)
    torch.testing.assert_close(lowpass(const, 4), const, atol=1e-5, rtol=0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checker = (((xx + yy) % 2) * 2 - 1).float().expand(1, 3, 64, 64)
    assert lowpass(checker, 4).abs().max() < 0.05
    sinus = torch.sin(2 * math.pi * xx / 64).float().expand(1, 3, 64, 64)
    assert (lowpass(sinus, 4) - sinus)[..., 8:-8, 8:-8].abs().max() < 0.05
    assert lowpass(sinus, 1) is not None and torch.equal(lowpass(sinus, 1), sinus)
    assert lowpass(sinus[0], 4).shape == (3, 64, 64)
    with pytest.raises(ValueError, match="divide"):
        lowpass(const, 5)
    with pytest.raises(ValueError):
        lowpass(const, 0)


def test_matlab_cubic_upsample_impulse_response():
    # x2 up of an impulse: MATLAB's cubic, a = -0.5, at distances 0.25, 0.75, 1.25, 1.75 (not torch's a = -0.75)
    impulse = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    impulse[..., 4, 4] = 1.0
    up = matlab_resize(impulse, (16, 16))[0, 0]
    w = torch.tensor([-0.0234375, -0.0703125, 0.2265625, 0.8671875], dtype=torch.float64)
    taps = torch.cat([w, w.flip(0)])  # outputs 5..12 around the impulse, symmetric
    torch.testing.assert_close(up[5:13, 5:13], torch.outer(taps, taps), atol=1e-12, rtol=0)
    assert up.sum().item() == pytest.approx(4.0)  # x2 up preserves the mean: sum grows by 2 x 2


@pytest.mark.parametrize("N", [2, 4, 8])
def test_lowpass_equals_basicsr_matlab_imresize_down_then_up(N):
    from basicsr.utils.matlab_functions import imresize  # an independent MATLAB imresize port

    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(N))
    down = imresize(x, 1 / N)
    ref = imresize(down, N)
    torch.testing.assert_close(matlab_resize(x, (64 // N, 64 // N)), down, atol=1e-5, rtol=0)
    # the whole image, borders included: both mirror symmetrically (edge pixel repeated)
    torch.testing.assert_close(lowpass(x, N), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lowpass(x.unsqueeze(0), N)[0], ref, atol=1e-5, rtol=0)


class _CountingModel:
    """A cheap ε model (ε-only, fixed large variance) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x_t, t):
        self.calls += 1
        return 0.1 * x_t


@pytest.mark.parametrize("name, run, calls", [
    # DR2 (respaced 100, code's tau=22): steps omega..tau+1 then Eq. 11's one call at tau: 47 - 22 + 1
    ("dr2", lambda x, m, g: dr2_sample(x, m, respace(BASE, 100), N=4, tau=220, generators=g), 26),
    # Algorithm 1 on 250 steps: K=600 -> index 150, every kept step 150..0
    ("lowfreq", lambda x, m, g: lowfreq_sample(x, None, m, respace(BASE, 250), N=4, generators=g), 151),
    # DiffBFR Algorithm 1: t = N2 ... 1 on the full schedule, exactly N2 = 100 calls
    ("polish", lambda x, m, g: polish_sample(x, m, BASE, generators=g), 100),
    ("polish n2=37", lambda x, m, g: polish_sample(x, m, BASE, n2=37, generators=g), 37),
    # the explicit speed option: N2 - 1 = 99 -> kept index 10 (t = 101) of 100, 11 steps
    ("polish respaced", lambda x, m, g: polish_sample(x, m, respace(BASE, 100), generators=g), 11),
])
def test_model_calls_per_method(name, run, calls):
    model = _CountingModel()
    out = run(_target(B=2, H=8, W=8), model, _gens([1, 2]))
    assert model.calls == calls and out.shape == (2, 3, 8, 8)


def test_difbfsr_runs_exactly_100_denoising_steps():
    # spec difbfsr.md §4.6: 250 respaced steps, start at index 100 (t=401) = exactly 100 steps. The
    # step count is the respaced index of t_start; counted on 25 steps (fast): 401 -> index 10, 10 calls
    d = DifBFSRConfig()
    assert respace(BASE, d.respace).index_for(d.t_start) == 100
    model = _CountingModel()
    cfg = DifBFSRConfig(respace=25, warmup=0, srm_channels=4, N=2)
    out = difbfsr_sample(_target(B=1, H=4, W=4), model, BASE, cfg, _gens([3]))
    assert model.calls == 10 and out.images.shape == (1, 3, 16, 16)


@pytest.mark.parametrize("steps", [1000, 100])
def test_dr2_oracle_recovers_target(steps):
    x0 = _target()
    sched = BASE if steps == 1000 else respace(BASE, steps)
    noise = 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    y = (x0 + noise).clamp(-1, 1)  # a degraded input
    out = dr2_sample(y, _oracle(x0), sched, N=4, tau=220, generators=_gens(range(4)))
    assert out.shape == x0.shape and out.abs().max() <= 1
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)


def test_lowfreq_and_polish_oracle_recover_target():
    x0 = _target(B=2)
    sched = respace(BASE, 250)
    y0 = (x0 + 0.2).clamp(-1, 1)
    out = lowfreq_sample(y0, None, _oracle(x0), sched, N=8, K=600, L=360, generators=_gens([3, 4]))
    torch.testing.assert_close(out, x0, atol=1e-3, rtol=0)
    pol = polish_sample(y0, _oracle(x0), sched, generators=_gens([5, 6]))
    torch.testing.assert_close(pol, x0, atol=1e-3, rtol=0)


def _noisy_model(x_t, t):
    """A per-image, deterministic, non-trivial ε model with learned-variance channels (6 = 2C)."""
    eps = 0.5 * x_t * torch.cos(t.float() / 100).view(-1, 1, 1, 1)
    return torch.cat([eps, torch.tanh(x_t)], 1)


def test_per_image_determinism_alone_vs_batch():
    x = _target()
    sched = respace(BASE, 100)
    seeds = [11, 12, 13, 14]
    for fn, kw in (
        (dr2_sample, dict(N=4, tau=200)),
        (lambda a, *r, **k: lowfreq_sample(a, None, *r, **k), dict(N=4, K=600, L=360)),
        (polish_sample, dict(n2=100)),
    ):
        batch = fn(x, _noisy_model, sched, generators=_gens(seeds), **kw)
        alone = fn(x[2:3], _noisy_model, sched, generators=_gens(seeds[2:3]), **kw)
        torch.testing.assert_close(alone[0], batch[2], atol=1e-6, rtol=0)
        again = fn(x, _noisy_model, sched, generators=_gens(seeds), **kw)
        assert torch.equal(batch, again)
        other = fn(x, _noisy_model, sched, generators=_gens([s + 100 for s in seeds]), **kw)
        assert not torch.equal(batch, other)


def test_bad_arguments_raise():
    x = _target(B=2)
    g = _gens([0, 1])
    with pytest.raises(ValueError, match="tau"):
        dr2_sample(x, _noisy_model, BASE, N=4, tau=300, omega=300, generators=g)
    with pytest.raises(ValueError):
        dr2_sample(x, _noisy_model, BASE, N=4, tau=1200, generators=g)
    with pytest.raises(ValueError, match="respaced"):
        dr2_sample(x, _noisy_model, respace(BASE, 10), N=4, tau=200, omega=240, generators=g)
    with pytest.raises(ValueError, match="divide"):
        dr2_sample(x, _noisy_model, BASE, N=5, tau=200, generators=g)
    with pytest.raises(ValueError, match="generator"):
        dr2_sample(x, _noisy_model, BASE, N=4, tau=200, generators=g[:1])
    with pytest.raises(ValueError, match="L"):
        lowfreq_sample(x, None, _noisy_model, BASE, N=4, K=300, L=300, generators=g)
    with pytest.raises(ValueError):
        polish_sample(x, _noisy_model, BASE, n2=0, generators=g)
    with pytest.raises(ValueError, match="n2 must be in 1..1000"):
        polish_sample(x, _noisy_model, BASE, n2=1001, generators=g)
    with pytest.raises(ValueError):
        respace(BASE, 0)
    with pytest.raises(ValueError):
        DDPMSchedule([])
