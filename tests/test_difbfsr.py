"""DifBFSR (issue 7 groundwork): per-image modules trained as one batch, the low band they fit, failures isolated."""

import pytest
import torch
import torch.nn.functional as F

from bfr_models.diffusion.difbfsr import DifBFSRConfig, StackedModules, _band, difbfsr_sample
from bfr_models.diffusion.schedule import DDPMSchedule
from bfr_models.diffusion.train import PriorTrainConfig, small_unet

FAST = dict(respace=20, t_start=401, warmup=20, srm_channels=16, N=4)


@pytest.fixture(scope="module")
def eps_model():
    torch.manual_seed(0)
    unet = small_unet(PriorTrainConfig(resolution=32, channels=(16, 32))).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    return lambda x, t: unet(x, t).sample


def lr_faces(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear", align_corners=False)
    return base * 2 - 1


def test_an_image_alone_equals_it_in_a_batch(eps_model):
    y = lr_faces(4)
    cfg = DifBFSRConfig(**FAST)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    batch = difbfsr_sample(y, eps_model, DDPMSchedule.linear(), cfg, gens([10, 11, 12, 13]))
    alone = difbfsr_sample(y[2:3], eps_model, DDPMSchedule.linear(), cfg, gens([12]))
    assert batch.images.shape == (4, 3, 32, 32) and all(batch.finite)
    assert torch.allclose(batch.images[2], alone.images[0], atol=1e-4)
    assert abs(batch.loss[2] - alone.loss[0]) < 1e-5


def test_warm_up_fits_the_low_band_far_better_than_bicubic():
    # a detailed LR input (noise-like texture) and the band of the data term at the LR grid (N = s = 4, §5)
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    mods = StackedModules(gens, channels=16, device="cpu")
    opt_s = torch.optim.Adam(mods.srm, lr=2e-3)
    opt_d = torch.optim.Adam(mods.cfm, lr=5e-3)
    band = 16
    target = _band(y, band)

    def loss():
        return 0.5 * ((_band(mods.predict(y, 4), band) - target) ** 2).flatten(1).mean(1)

    best = torch.full((2,), float("inf"))
    for _ in range(150):
        for opt in (opt_s, opt_d):
            opt.zero_grad()
            per_image = loss()
            per_image.sum().backward()
            opt.step()
        best = torch.minimum(best, per_image.detach())
    with torch.no_grad():
        ours = loss()
    # bicubic of a Gaussian-blurred-then-decimated input is the classical baseline; here the input itself
    bicubic = F.interpolate(y, scale_factor=4, mode="bicubic", align_corners=False)
    base = 0.5 * ((_band(bicubic, band) - target) ** 2).flatten(1).mean(1)
    # Adam at the paper's rates spikes now and then (here image 2 near iteration 100 since the band is
    # MATLAB's resize, whose mirrored borders moved the trajectory): bound the best fit and the last one
    assert (best < base / 5).all(), (best.tolist(), base.tolist())
    assert (ours < base / 2).all(), (ours.tolist(), base.tolist())


def test_a_non_finite_image_does_not_stop_the_others(eps_model):
    y = lr_faces(2)
    y_bad = y.clone()
    y_bad[1, 0, 0, 0] = float("nan")
    cfg = DifBFSRConfig(**FAST)
    out = difbfsr_sample(y_bad, eps_model, DDPMSchedule.linear(), cfg,
                         [torch.Generator().manual_seed(s) for s in (5, 6)])
    alone = difbfsr_sample(y[:1], eps_model, DDPMSchedule.linear(), cfg, [torch.Generator().manual_seed(5)])
    assert out.finite == [True, False] and "non-finite loss at warm-up iteration 0" in out.error[1]
    assert torch.allclose(out.images[0], alone.images[0], atol=1e-4)


@pytest.mark.parametrize("cfg, message", [
    (DifBFSRConfig(scale=3), "scale 3 has no SR module config"),
    (DifBFSRConfig(N=5), "N=5 does not divide"),
    (DifBFSRConfig(t_start=1200), "t_start=1200"),
])
def test_bad_settings_are_one_line_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate(512)
