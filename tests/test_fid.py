"""FID: Frechet distance against closed forms and pyiqa, the two conventions' resizing and features
against pyiqa's (clean-fid-derived) pipeline, stats files, the feature cache, and the fail-fast checks.

Weights are built here: the real FID-Inception architecture with seeded random weights, saved under
the model card's file name in a temporary model cache with a temporary card carrying its sha256.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfr_models.metrics import fid as F
from bfr_models.models import ModelMissingError, load_cards
from tests.conftest import install_models

# ----------------------------------------------------------------------------- helpers


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights that keep activations O(1) through the whole depth (so comparisons mean something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            elif isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.01, generator=g)
                m.bias.zero_()
    return net.eval()


class _TorchScriptStandIn(torch.nn.Module):
    """Same interface as clean-fid's inception-2015-12-05.pt: a ``layers`` module taking the normalised input."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return self.layers((x - 128.0) / 128.0)


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """(state-dict bytes, torchscript bytes) of one seeded FID-Inception."""
    net = _randomize(F.FIDInceptionV3())
    d = tmp_path_factory.mktemp("inception")
    torch.save(net.state_dict(), d / "sd.pth")
    torch.jit.save(torch.jit.script(_TorchScriptStandIn(net)), str(d / "ts.pt"))
    return (d / "sd.pth").read_bytes(), (d / "ts.pt").read_bytes()


@pytest.fixture()
def inception_cache(monkeypatch, tmp_path, inception_files):
    sd, ts = inception_files
    return install_models(monkeypatch, tmp_path, {"fid_inception_pytorch": sd, "fid_inception_clean": ts})


def _faces(n: int, seed: int = 0, size=(64, 64)) -> np.ndarray:
    """Smooth colour images with structure (gradients + blobs), uint8 (n, H, W, 3)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        img = np.zeros((h, w, 3))
        for c in range(3):
            a, b, cx, cy, r = rng.uniform(-1, 1, 2).tolist() + rng.uniform(0.2, 0.8, 3).tolist()
            img[..., c] = 0.5 + 0.3 * (a * xx + b * yy) + 0.4 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.1 * r))
        img += rng.normal(0, 0.03, img.shape)
        out.append(np.clip(img * 255, 0, 255).round().astype(np.uint8))
    return np.stack(out)


def _write_pngs(folder: Path, imgs: np.ndarray, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(imgs, start):
        p = folder / f"img_{i:04d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


def _pyiqa_inception(monkeypatch, weights: Path):
    """pyiqa's FID Inception (pytorch-fid's code) loading our weights file instead of downloading."""
    import pyiqa.archs.inception as pin
    from pyiqa.archs.fid_arch import FID

    monkeypatch.setattr(pin, "FID_WEIGHTS_URL", str(weights))
    return FID(dims=2048).model.eval()


# ----------------------------------------------------------------------------- Frechet distance


def _closed_form(mu1, a, mu2, b):
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b)))


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    got = F.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    # by hand for one small case: |(1,2)-(0,0)|^2 + (1+4-2*2) + (9+1-2*3) = 5 + 1 + 4
    assert F.frechet_distance([1, 2], np.diag([1, 9]), [0, 0], np.diag([4, 1])) == pytest.approx(10.0, abs=1e-12)
    assert got == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-10)


def test_frechet_distance_rotated_commuting_covariances():
    # Q diag(a) Q^T and Q diag(b) Q^T commute: the distance is the diagonal closed form.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    a, b = rng.uniform(0.1, 2, 12), rng.uniform(0.1, 2, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    got = F.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(_closed_form(mu1, a, mu2, b), rel=1e-8)


def test_frechet_distance_identical_stats_is_zero():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 16))
    mu, sigma = F.stats_from_features(x)
    assert abs(F.frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_distance_matches_pyiqa_including_singular():
    from pyiqa.archs.fid_arch import frechet_distance as pyiqa_fd

    rng = np.random.default_rng(3)
    for n in (500, 6):  # full-rank, then rank-deficient (6 samples in 32 dimensions)
        f1, f2 = rng.normal(size=(n, 32)), rng.normal(0.3, 1.2, size=(n, 32))
        m1, s1 = F.stats_from_features(f1)
        m2, s2 = F.stats_from_features(f2)
        ours = F.frechet_distance(m1, s1, m2, s2)
        assert np.isfinite(ours)
        assert ours == pytest.approx(float(pyiqa_fd(m1, s1, m2, s2)), rel=1e-6)


def test_stats_from_features_matches_numpy():
    x = np.random.default_rng(4).normal(size=(50, 7)).astype(np.float32)
    mu, sigma = F.stats_from_features(x)
    assert mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


# ----------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("size", [(64, 64), (512, 384), (17, 33)])
def test_clean_resize_of_constant_image_is_constant(size):
    img = np.full((*size, 3), (200, 3, 77), dtype=np.uint8)
    out = F.clean_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(np.array([200, 3, 77], np.float32), out.shape), atol=1e-3)


def test_resizers_match_pyiqa_clean_fid_code(tmp_path):
    """Our clean / legacy_pytorch resizes equal pyiqa's copy of clean-fid's ResizeDataset on the same PNG."""
    from pyiqa.archs.fid_arch import ResizeDataset

    img = _faces(1, seed=5, size=(96, 80))[0]
    (path,) = _write_pngs(tmp_path, img[None])
    theirs_clean = ResizeDataset([str(path)], mode="clean")[0].numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(F.clean_resize(img), theirs_clean)

    theirs_legacy = ResizeDataset([str(path)], mode="legacy_pytorch")[0] / 255.0  # resized on the 0..255 scale
    ours_legacy = F.legacy_pytorch_resize(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255.0)[0]
    torch.testing.assert_close(ours_legacy, theirs_legacy, atol=1e-6, rtol=0)


def test_float_images_are_quantised_like_the_png_they_become():
    img = _faces(2, seed=6)
    as_float = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
    for a, b in zip(F.to_uint8_images(as_float), img):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- features


@pytest.mark.parametrize("convention", ["legacy_pytorch", "clean"])
def test_features_match_pyiqa(convention, inception_cache, monkeypatch, tmp_path):
    """Same weights, same PNGs: our features equal pyiqa's folder pipeline (clean-fid's code) in each mode."""
    from pyiqa.archs.fid_arch import get_folder_features

    imgs = np.concatenate([_faces(3, seed=7), _faces(2, seed=8)])
    folder = tmp_path / "imgs"
    _write_pngs(folder, imgs)
    sd_path = inception_cache / load_cards()["fid_inception_pytorch"].filename
    # pyiqa runs the pytorch-fid network in both modes; give ours the same network for the comparison.
    ours = F.InceptionFeatures(convention, weights_path=sd_path, batch_size=2)(torch.from_numpy(imgs).permute(0, 3, 1, 2))
    theirs = get_folder_features(str(folder), model=_pyiqa_inception(monkeypatch, sd_path), num_workers=0, batch_size=4,
                                 device=torch.device("cpu"), mode=convention, verbose=False)
    assert ours.shape == (5, 2048) and ours.dtype == np.float64
    assert np.abs(ours).mean() > 1e-2  # the weights carry signal
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_clean_uses_torchscript_card_like_clean_fid(inception_cache):
    """Default clean network = the fid_inception_clean TorchScript, called as clean-fid does (layers((x-128)/128))."""
    imgs = torch.from_numpy(_faces(3, seed=9, size=(80, 72))).permute(0, 3, 1, 2)
    ts = F.InceptionFeatures("clean")
    assert ts.network.startswith("tf-inception-torchscript:inception-2015-12-05.pt")
    sd = F.InceptionFeatures("clean", weights_path=inception_cache / load_cards()["fid_inception_pytorch"].filename)
    assert sd.network.startswith("pytorch-fid-inception:")
    np.testing.assert_allclose(ts(imgs), sd(imgs), rtol=1e-5, atol=1e-6)
    legacy = F.InceptionFeatures("legacy_pytorch")
    assert legacy.network.startswith("pytorch-fid-inception:pt_inception-2015-12-05-6726825d.pth")
    assert legacy.fingerprint != sd.fingerprint  # convention is part of the cache key
    ts_file = inception_cache / load_cards()["fid_inception_clean"].filename
    with pytest.raises(F.FIDError, match="the 'legacy_pytorch' convention runs pytorch-fid's network"):
        F.InceptionFeatures("legacy_pytorch", weights_path=ts_file)


def test_batching_and_mixed_sizes_do_not_change_features(inception_cache):
    ext1 = F.InceptionFeatures("legacy_pytorch", batch_size=1)
    ext4 = F.InceptionFeatures("clean", batch_size=4, resize_workers=2)
    imgs = [_faces(1, seed=10, size=(64, 64))[0], _faces(1, seed=11, size=(90, 70))[0], _faces(1, seed=12)[0]]
    one_by_one = np.concatenate([ext1([im]) for im in imgs])
    np.testing.assert_allclose(ext1(imgs), one_by_one, rtol=1e-5, atol=1e-6)
    clean_single = np.concatenate([ext4([im]) for im in imgs])
    np.testing.assert_allclose(ext4(imgs), clean_single, rtol=1e-5, atol=1e-6)


def test_missing_inception_weights_fail_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ModelMissingError) as e:
        F.InceptionFeatures("clean")
    msg = str(e.value)
    assert "\n" not in msg and "inception-2015-12-05.pt" in msg and "bfr-curate models pull fid_inception_clean" in msg
    with pytest.raises(ModelMissingError, match="pt_inception-2015-12-05-6726825d.pth"):
        F.InceptionFeatures("legacy_pytorch")


def test_unknown_convention_is_one_line_error():
    with pytest.raises(F.FIDError, match="unknown FID convention 'legacy_tensorflow'"):
        F.InceptionFeatures("legacy_tensorflow")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- stats files and references


def _random_stats(seed=0, convention="clean") -> F.FIDStats:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(2048, 64))
    return F.FIDStats(rng.normal(size=2048), a @ a.T / 64 + np.eye(2048) * 0.01, 5000, convention, "s3://bucket/ffhq", "net:x")


def test_stats_npz_roundtrip_and_convention_check(tmp_path):
    stats = _random_stats()
    path = tmp_path / "ref.npz"
    stats.save(path)
    back = F.FIDStats.load(path, convention="clean")
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    assert (back.n, back.convention, back.source, back.network) == (5000, "clean", "s3://bucket/ffhq", "net:x")
    with pytest.raises(F.FIDError, match="computed with the 'clean' convention, not 'legacy_pytorch'"):
        F.FIDStats.load(path, convention="legacy_pytorch")


def test_fid_result_records_convention_and_reference():
    rng = np.random.default_rng(12)
    ref = F.FIDStats.from_features(rng.normal(size=(300, 16)), "clean", "s3://refs/ffhq512", "net:a")
    test = F.FIDStats.from_features(rng.normal(0.5, 1.0, size=(100, 16)), "clean", "restored", "net:a")
    result = F.fid_from_stats(test, ref)
    assert result.value == pytest.approx(F.frechet_distance(test.mu, test.sigma, ref.mu, ref.sigma))
    assert result.as_record() == {"fid": result.value, "fid_convention": "clean", "fid_reference": "s3://refs/ffhq512",
                                  "fid_n": 100, "fid_reference_n": 300, "fid_network": "net:a"}
    other = F.FIDStats.from_features(rng.normal(size=(100, 16)), "legacy_pytorch", "restored", "net:b")
    with pytest.raises(F.FIDError, match="set uses the 'legacy_pytorch' convention but the reference uses 'clean'"):
        F.fid_from_stats(other, ref)


def test_foreign_stats_file_needs_a_convention(tmp_path):
    s = _random_stats()
    named = tmp_path / "ffhq_clean_trainval70k_512.npz"  # clean-fid / pyiqa naming
    np.savez(named, mu=s.mu, sigma=s.sigma)
    loaded = F.FIDStats.load(named, convention="clean")
    assert loaded.convention == "clean" and loaded.n == -1
    bare = tmp_path / "ffhq_stats.npz"
    np.savez(bare, mu=s.mu, sigma=s.sigma)
    with pytest.raises(F.FIDError, match="records no convention"):
        F.FIDStats.load(bare)
    assert F.FIDStats.load(bare, assume_convention="legacy_pytorch").convention == "legacy_pytorch"


def test_small_reference_is_refused_before_any_work(tmp_path):
    with pytest.raises(F.FIDError) as e:
        F.check_reference_size(100)
    assert "\n" not in str(e.value) and "the covariance is rank-deficient below 2048 images" in str(e.value)
    F.check_reference_size(100, allow_small=True)
    F.check_reference_size(2048)
    _write_pngs(tmp_path / "ref", _faces(3))
    with pytest.raises(F.FIDError, match="FID reference has 3 images; the covariance is rank-deficient below 2048"):
        F.plan_reference(tmp_path / "ref", "clean")  # no model, no image decoded
    small = _random_stats()
    small.n = 500
    small.save(tmp_path / "small.npz")
    with pytest.raises(F.FIDError, match="has 500 images"):
        F.plan_reference(tmp_path / "small.npz", "clean")
    with pytest.raises(F.FIDError, match="not found"):
        F.plan_reference(tmp_path / "nowhere", "clean")


def test_feature_cache_extracts_only_new_images(inception_cache, tmp_path, monkeypatch):
    ext = F.InceptionFeatures("clean", batch_size=4)
    calls = []
    real_call = F.InceptionFeatures.__call__

    def counting(self, images):
        calls.append(len(images))
        return real_call(self, images)

    folder = tmp_path / "set"
    first = _write_pngs(folder, _faces(4, seed=20))
    cache = F.FeatureCache(tmp_path / "cache", ext.fingerprint)
    monkeypatch.setattr(F.InceptionFeatures, "__call__", counting)
    r1 = F.extract_features([F.ImageRef(str(p)) for p in first], ext, cache)
    assert r1.extracted == 4 and sum(calls) == 4
    more = _write_pngs(folder, _faces(2, seed=21), start=4)
    calls.clear()
    cache2 = F.FeatureCache(tmp_path / "cache", ext.fingerprint)  # a new process: reads the shards
    r2 = F.extract_features([F.ImageRef(str(p)) for p in first + more], ext, cache2)
    assert r2.extracted == 2 and sum(calls) == 2
    np.testing.assert_array_equal(r2.feats[:4], r1.feats)
    # a broken file is left out with its reason, the rest goes on
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r3 = F.extract_features([F.ImageRef(str(folder / "broken.png")), F.ImageRef(str(first[0]))], ext, cache2)
    assert r3.feats.shape == (1, 2048) and r3.extracted == 0 and len(r3.errors) == 1


def test_reference_stats_are_cached_by_content_and_record_convention(inception_cache, tmp_path, monkeypatch):
    ext = F.InceptionFeatures("legacy_pytorch", batch_size=8)
    ref_dir = tmp_path / "ref"
    _write_pngs(ref_dir, _faces(6, seed=30))
    stats = F.reference_stats(F.plan_reference(ref_dir, "legacy_pytorch", allow_small=True), ext, tmp_path / "cache")
    assert (stats.n, stats.convention, stats.source, stats.network) == (6, "legacy_pytorch", str(ref_dir), ext.network)
    cached = list((tmp_path / "cache" / "fid-stats").glob("*.npz"))
    assert len(cached) == 1 and F.FIDStats.load(cached[0]).convention == "legacy_pytorch"

    def boom(self, images):
        raise AssertionError("features recomputed")

    with monkeypatch.context() as m:
        m.setattr(F.InceptionFeatures, "__call__", boom)
        again = F.reference_stats(F.plan_reference(ref_dir, "legacy_pytorch", allow_small=True), ext, tmp_path / "cache")
    np.testing.assert_array_equal(again.sigma, stats.sigma)

    with pytest.raises(F.FIDError, match="'legacy_pytorch' convention, not 'clean'"):
        F.reference_stats(tmp_path / "cache" / "fid-stats" / cached[0].name, F.InceptionFeatures("clean"))


def test_reference_stats_stream_in_chunks(inception_cache, tmp_path, monkeypatch):
    """A reference is featurised and summed a chunk at a time (memory: one chunk, whatever its size), with the
    statistics of all its features at once; a second run reads the cached features, one chunk at a time too."""
    from bfr_models.metrics import fid_features

    ext = F.InceptionFeatures("legacy_pytorch", batch_size=4)
    ref_dir = tmp_path / "ref"
    paths = _write_pngs(ref_dir, _faces(7, seed=31))
    whole = F.extract_features([F.ImageRef(str(p)) for p in paths], ext)
    chunks, extract = [], fid_features.extract_features
    monkeypatch.setattr(fid_features, "REFERENCE_CHUNK", 3)
    monkeypatch.setattr(fid_features, "extract_features", lambda refs, *a, **k: chunks.append(len(refs)) or extract(refs, *a, **k))
    for cache_root in (tmp_path / "cache", tmp_path / "cache"):  # the second run: from the feature cache
        for stats_file in (tmp_path / "cache" / "fid-stats").glob("*.npz"):
            stats_file.unlink()  # not from the cached statistics
        chunks.clear()
        stats = F.reference_stats(F.plan_reference(ref_dir, "legacy_pytorch", allow_small=True), ext, cache_root)
        assert chunks == [3, 3, 1] and stats.n == 7
        np.testing.assert_allclose(stats.mu, whole.feats.mean(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(stats.sigma, np.cov(whole.feats, rowvar=False), rtol=0, atol=1e-9)


def test_reference_from_manifest_on_s3_reuses_features_by_content(inception_cache, tmp_path, s3_endpoint, monkeypatch):
    """A manifest reference on S3: its rows' sha256 key the cache, so images already featurised anywhere
    (here: the same pixels in a local folder) are not run again; error rows are not part of the reference."""
    import s3fs

    from bfr_models import storage
    from bfr_models.manifest import ManifestWriter

    s3fs.S3FileSystem(anon=False).mkdir("fid-ref")
    ext = F.InceptionFeatures("clean", batch_size=8)
    imgs = _faces(4, seed=40)
    local = _write_pngs(tmp_path / "local", imgs)
    cache_root = "s3://fid-ref/cache"
    F.extract_features([F.ImageRef(str(p)) for p in local], ext, F.FeatureCache(cache_root, ext.fingerprint))

    writer = ManifestWriter("s3://fid-ref/stage/abc")
    rows = []
    for i, p in enumerate(local):
        data = p.read_bytes()
        uri = writer.write_image(f"img{i}", data)
        rows.append({"image_id": f"img{i}", "uri": uri, "sha256": storage.sha256_hex(data), "stage": "degrade", "status": "ok"})
    rows.append({"image_id": "bad", "uri": "s3://fid-ref/nowhere.png", "stage": "degrade", "status": "error", "error": "x"})
    writer.write_index("degrade", "abc", {}, [writer.write_shard("0000", rows)])

    plan = F.plan_reference("s3://fid-ref/stage/abc", "clean", allow_small=True)
    assert (plan.kind, plan.n) == ("manifest", 4)

    def boom(self, images):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(F.InceptionFeatures, "__call__", boom)
    stats = F.reference_stats(plan, ext, cache_root)
    assert (stats.n, stats.convention, stats.source) == (4, "clean", "s3://fid-ref/stage/abc")
    assert storage.exists(f"{cache_root}/fid-stats/clean-{F._short_hash(ext.fingerprint)}-{plan.content_key}.npz")
