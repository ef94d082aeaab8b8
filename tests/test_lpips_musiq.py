"""LPIPS (lpips package, backbone from a model card) and MUSIQ (pyiqa's architecture, weights from a card).

Weights are built here from the real architectures (torchvision VGG-16 / AlexNet, pyiqa's MUSIQ) with
seeded random values, saved under the card's file name in a temporary model cache, with a temporary
card carrying their sha256. Each metric is compared with pyiqa computing the same thing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from bfr_models.metrics import lpips_metric as L
from bfr_models.metrics import musiq as M
from bfr_models.models import ModelMissingError, load_cards
from tests.conftest import install_models


def _images(n: int, seed: int, size=(32, 32)) -> torch.Tensor:
    """Smooth structured images in [0, 1] (low-res noise upsampled), (n, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size[0] // 8, size[1] // 8, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------- LPIPS

TRUNKS = {"vgg": (torchvision.models.vgg16, 30), "alex": (torchvision.models.alexnet, 12)}  # last relu5 index + 1


def _torchvision_backbone(net: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TRUNKS[net][0](weights=None).eval()  # torchvision's own (random) initialisation


def _backbone_bytes(model: torch.nn.Module, extra: dict | None = None) -> bytes:
    """torchvision key names (``features.<i>.weight``); the big classifier is left out to keep the file small."""
    import io

    state = {k: v for k, v in model.state_dict().items() if k.startswith("features.")}
    state.update(extra or {})
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def backbones():
    return {net: _torchvision_backbone(net, seed=i) for i, net in enumerate(TRUNKS)}


@pytest.fixture()
def lpips_cache(monkeypatch, tmp_path, backbones):
    files = {"lpips_vgg16_backbone": _backbone_bytes(backbones["vgg"]),
             # a full torchvision checkpoint also holds the classifier: it must be ignored
             "lpips_alex_backbone": _backbone_bytes(backbones["alex"], {"classifier.6.bias": torch.zeros(1000)})}
    return install_models(monkeypatch, tmp_path, files)


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_backbone_comes_from_the_card_file(net, lpips_cache, backbones):
    import lpips as lpips_pkg

    metric = L.LPIPS(net)
    ref = backbones[net].state_dict()
    loaded = metric.model.net.state_dict()
    assert len(loaded) == sum(1 for k in ref if k.startswith("features."))
    for key, value in loaded.items():  # "slice<k>.<i>.<p>" <- "features.<i>.<p>"
        _, idx, pname = key.split(".", 2)
        torch.testing.assert_close(value, ref[f"features.{idx}.{pname}"], rtol=0, atol=0)
    # the linear layers are the package's calibrated ones
    shipped = torch.load(Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu", weights_only=True)
    for key, value in shipped.items():
        torch.testing.assert_close(metric.model.state_dict()[key], value, rtol=0, atol=0)
    # end to end, the trunk computes torchvision's own features of the file's network
    x = _images(2, seed=1) * 2 - 1
    with torch.no_grad():
        relu5 = metric.model.net(metric.model.scaling_layer(x))[-1]
        torch.testing.assert_close(relu5, backbones[net].features[:TRUNKS[net][1]](metric.model.scaling_layer(x)))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_zero_on_identical_and_grows_with_noise(net, lpips_cache):
    metric = L.LPIPS(net, batch_size=2)
    x = _images(3, seed=2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x.shape, generator=g)
    same = metric(x, x)
    assert same.shape == (3,) and torch.all(same.abs() < 1e-6)
    d_small = metric(x, (x + 0.03 * noise).clamp(0, 1))
    d_big = metric(x, (x + 0.2 * noise).clamp(0, 1))
    assert torch.all(d_small > 0) and torch.all(d_big > d_small)
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(metric(as_uint8, as_uint8), torch.zeros(3))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_pyiqa(net, lpips_cache, backbones, monkeypatch):
    """pyiqa builds its own trunk (its slicing of torchvision's network, here given our weights) and loads the
    lpips package's linear layers: its LPIPS must equal ours."""
    import lpips as lpips_pkg
    import pyiqa
    import pyiqa.archs.lpips_arch as pyiqa_lpips

    ctor, _ = TRUNKS[net]

    def offline_torchvision(weights=None, **kw):  # pyiqa asks torchvision for ImageNet weights: give it the test's
        model = ctor(weights=None)
        model.load_state_dict(backbones[net].state_dict())
        return model

    monkeypatch.setattr(pyiqa_lpips.models, "vgg16" if net == "vgg" else "alexnet", offline_torchvision)
    lins = Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    theirs = pyiqa.create_metric("lpips-vgg" if net == "vgg" else "lpips", pretrained_model_path=str(lins), device="cpu")
    ours = L.LPIPS(net, batch_size=2)
    a, b = _images(3, seed=4), _images(3, seed=5)
    torch.testing.assert_close(ours(a, b), theirs(a, b).reshape(3), rtol=1e-5, atol=1e-6)


def test_lpips_missing_backbone_fails_before_any_compute(monkeypatch, tmp_path):
    import lpips as lpips_pkg

    def never(*a, **k):
        raise AssertionError("lpips network built although the backbone is missing")

    monkeypatch.setattr(lpips_pkg, "LPIPS", never)
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelMissingError) as e:
        L.LPIPS("vgg")
    assert "\n" not in str(e.value) and "vgg16-397923af.pth" in str(e.value)
    assert "bfr-curate models pull lpips_vgg16_backbone" in str(e.value)
    with pytest.raises(ModelMissingError, match="alexnet-owt-7be5be79.pth"):
        L.LPIPS("alex")


def test_lpips_wrong_backbone_file_is_one_line_error(tmp_path, backbones):
    path = tmp_path / "vgg.pth"
    path.write_bytes(_backbone_bytes(backbones["vgg"]))
    with pytest.raises(L.LPIPSWeightsError) as e:
        L.LPIPS("alex", backbone_path=path)
    assert "\n" not in str(e.value) and "features.0.weight" in str(e.value)


# ----------------------------------------------------------------------------- MUSIQ


def test_musiq_equals_pyiqa(monkeypatch, tmp_path, musiq_bytes):
    import pyiqa
    from pyiqa.archs.musiq_arch import MUSIQ as PyiqaMUSIQ

    cache = install_models(monkeypatch, tmp_path, {"musiq_koniq": musiq_bytes})
    weights = cache / load_cards()["musiq_koniq"].filename
    ours = M.MUSIQ(batch_size=2)
    x = _images(2, seed=6, size=(48, 40))
    got = ours(x)
    assert got.shape == (2,) and torch.isfinite(got).all()

    direct = PyiqaMUSIQ(pretrained=False, pretrained_model_path=str(weights)).eval()  # pyiqa's arch, called directly
    with torch.no_grad():
        assert torch.equal(got, direct(x).reshape(2))
    metric = pyiqa.create_metric("musiq", pretrained_model_path=str(weights), device="cpu")  # pyiqa's whole metric
    assert torch.equal(got, metric(x).reshape(2))
    # 8-bit input is read as /255
    q = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(ours(q), ours(q.float() / 255))


def test_musiq_scores_the_same_bits_in_turn_and_on_two_cpu_lanes(tmp_path, musiq_bytes):
    from bfr_models.device import set_cpu_lanes

    path = tmp_path / "musiq.pth"
    path.write_bytes(musiq_bytes)
    ours, x = M.MUSIQ(weights_path=path, batch_size=1), _images(4, seed=8, size=(40, 48))
    try:
        set_cpu_lanes(1)
        in_turn = ours(x)
        set_cpu_lanes(2)
        on_lanes = ours(x)
    finally:
        set_cpu_lanes(1)
    assert len(set(in_turn.tolist())) == 4 and torch.equal(in_turn, on_lanes)


def test_clean_calibration_and_shards_share_one_musiq(monkeypatch, tmp_path, backbones, musiq_bytes):
    """Clean's set calibration asks for MUSIQ alone and its shards for MUSIQ and LPIPS: one MUSIQ serves both."""
    from tasks.clean import cached_scorer, cached_scorers

    install_models(monkeypatch, tmp_path, {"musiq_koniq": musiq_bytes,
                                           "lpips_vgg16_backbone": _backbone_bytes(backbones["vgg"])})
    cached_scorer.cache_clear()
    calibration, shards = cached_scorers(True, False, False, "cpu"), cached_scorers(True, True, False, "cpu")
    assert calibration[0] is shards[0] and isinstance(shards[0], M.MUSIQ) and isinstance(shards[1], L.LPIPS)
    assert calibration[1:] == (None, None) and cached_scorer.cache_info().misses == 2


def test_musiq_missing_weights_fail_before_any_work(monkeypatch, tmp_path):
    def never(**kw):
        raise AssertionError("MUSIQ built although its weights are missing")

    monkeypatch.setattr(M, "build_musiq_arch", never)
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelMissingError) as e:
        M.MUSIQ()
    msg = str(e.value)
    assert "\n" not in msg and "musiq_koniq_ckpt-e95806b9.pth" in msg and "bfr-curate models pull musiq_koniq" in msg


def test_musiq_explicit_weights_path_and_bad_file(tmp_path, musiq_bytes):
    path = tmp_path / "musiq.pth"
    path.write_bytes(musiq_bytes)
    assert M.MUSIQ(weights_path=path)(_images(1, seed=7, size=(40, 40))).shape == (1,)
    bad = tmp_path / "bad.pth"
    torch.save({"conv_root.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="is not a MUSIQ-KonIQ state dict"):
        M.MUSIQ(weights_path=bad)
    with pytest.raises(FileNotFoundError, match="MUSIQ weights not found"):
        M.MUSIQ(weights_path=tmp_path / "absent.pth")
