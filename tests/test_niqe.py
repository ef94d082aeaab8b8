"""NIQE against pyiqa, BasicSR and the official MATLAB values on the TID2013 calibration images.

Calibration data: ../shared/calibration/tid2013 (README.md, reference_scores.csv, dist/*.bmp).
docs/niqe_calibration.md has the per-image table and why the two conventions differ.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bfr_models.metrics.niqe import niqe, niqe_convention, pristine_params, pristine_params_path

REPO = Path(__file__).resolve().parents[1]
TID = REPO.parent / "shared" / "calibration" / "tid2013"
NAMES = ("I03", "I04", "I06", "I08", "I19")

# ../shared/calibration/tid2013/README.md, typed in again here (the README gives them as prose):
# "pyiqa's own values on the same images: niqe ..." and "BasicSR's NIQE (... rgb2gray ... rounded)".
README_PYIQA = (15.6538, 3.6549, 3.2342, 3.1922, 9.0722)
README_BASICSR = (15.5929, 3.6545, 3.2250, 3.1936, 9.0745)


def _tid_folder() -> Path:
    if not (TID / "reference_scores.csv").is_file():
        pytest.fail(f"calibration data missing: {TID} (the shared TID2013 calibration folder)")
    return TID


def official(metric: str) -> np.ndarray:
    with open(_tid_folder() / "reference_scores.csv", newline="") as f:
        rows = {r["metric"]: r for r in csv.DictReader(f)}
    return np.array([float(rows[metric][n]) for n in NAMES])


def load(folder: str) -> torch.Tensor:
    """(5, 3, 384, 512) float32 in [0, 1], as pyiqa reads images (PIL -> /255)."""
    ims = [np.asarray(Image.open(_tid_folder() / folder / f"{n}.bmp").convert("RGB")) for n in NAMES]
    return torch.from_numpy(np.stack(ims).copy()).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def dist() -> torch.Tensor:
    return load("dist")


@pytest.fixture(scope="module")
def ours(dist) -> dict[str, np.ndarray]:
    return {c: niqe(dist, convention=c).numpy() for c in ("pyiqa", "live_computequality")}


def rel(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.float64) / np.asarray(b, dtype=np.float64) - 1)


def test_pristine_model_is_the_basicsr_package_file():
    spec = importlib.util.find_spec("basicsr")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "basicsr-fixed is not installed"
    package_file = Path(spec.submodule_search_locations[0]) / "metrics" / "niqe_pris_params.npz"
    ours_bytes, theirs = pristine_params_path().read_bytes(), package_file.read_bytes()
    assert ours_bytes == theirs
    digest = hashlib.sha256(ours_bytes).hexdigest()
    assert digest in (REPO / "catalogs" / "metrics" / "PROVENANCE.md").read_text()
    mu, cov = pristine_params()
    with np.load(package_file) as z:
        assert np.array_equal(mu, z["mu_pris_param"].reshape(-1))
        assert np.array_equal(cov, z["cov_pris_param"])
    assert np.allclose(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0)


def test_pyiqa_convention_matches_calibration_readme(ours):
    assert rel(ours["pyiqa"], README_PYIQA).max() < 0.005, (ours["pyiqa"], README_PYIQA)
    assert rel(ours["pyiqa"], README_BASICSR).max() < 0.005, (ours["pyiqa"], README_BASICSR)


def test_pyiqa_convention_matches_live_pyiqa(dist, ours, tmp_path):
    """Within the 0.5% bar, not bit for bit: pyiqa's gray is a float32 matmul whose rounding is the CPU's."""
    import scipy.io
    from pyiqa.archs.niqe_arch import NIQE

    # pyiqa's NIQE with the same LIVE model (its own download is niqe_modelparameters.mat, the same numbers)
    mu, cov = pristine_params()
    mat = tmp_path / "niqe_modelparameters.mat"
    scipy.io.savemat(mat, {"mu_prisparam": mu[None], "cov_prisparam": cov})
    metric = NIQE(pretrained_model_path=str(mat))
    theirs = np.array([metric(dist[i:i + 1]).item() for i in range(len(NAMES))])
    assert rel(ours["pyiqa"], theirs).max() < 0.005, (ours["pyiqa"], theirs)


def test_pyiqa_convention_matches_live_basicsr(dist, ours):
    from basicsr.metrics.niqe import niqe as basicsr_niqe
    from pyiqa.utils.color_util import to_y_channel

    with np.load(pristine_params_path()) as z:
        mu, cov, window = z["mu_pris_param"], z["cov_pris_param"], z["gaussian_window"]
    gray = to_y_channel(dist, 255, "yiq")[:, 0].double().numpy()  # the gray image pyiqa feeds its NIQE
    theirs = np.array([basicsr_niqe(g, mu, cov, window) for g in gray])
    assert rel(ours["pyiqa"], theirs).max() < 0.005, (ours["pyiqa"], theirs)


def test_live_computequality_convention_within_1pct_of_official_matlab(dist, ours):
    ref = official("niqe")
    assert rel(ours["live_computequality"], ref).max() < 0.01, (ours["live_computequality"], ref)
    # the old name is an alias of the same convention
    assert niqe(dist[4:5], convention="matlab").item() == niqe(dist[4:5], convention="live_computequality").item()
    assert niqe_convention("matlab") == "live_computequality" and niqe_convention("pyiqa") == "pyiqa"


def test_conventions_differ_only_through_flat_regions(ours):
    # I04 has no flat 7x7 neighbourhood: both conventions agree; I19 (posterised) is 30% flat.
    r = rel(ours["live_computequality"], ours["pyiqa"])
    assert r[NAMES.index("I04")] < 1e-4
    assert r[NAMES.index("I19")] > 0.04
    assert rel(ours["pyiqa"], official("niqe"))[NAMES.index("I19")] > 0.04  # the documented discrepancy


@pytest.mark.parametrize("convention", ["pyiqa", "live_computequality"])
def test_batch_equals_single_images_and_lists_group_by_size(dist, ours, convention):
    single = np.array([niqe(dist[i:i + 1], convention=convention).item() for i in range(len(NAMES))])
    np.testing.assert_allclose(single, ours[convention], rtol=1e-12, atol=0)
    # a list of differently sized images comes back in input order
    crops = [dist[0, :, :300, :400], dist[1:3], dist[3, :, :200, :], dist[4]]
    got = niqe(crops, convention=convention).numpy()
    want = [niqe(dist[0:1, :, :300, :400], convention).item(), *ours[convention][1:3],
            niqe(dist[3:4, :, :200, :], convention).item(), ours[convention][4]]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_crop_border_and_input_dtype(dist):
    c = 8
    a = niqe(dist[:2], crop_border=c)
    b = niqe(dist[:2, :, c:-c, c:-c])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=0)
    assert not np.allclose(a.numpy(), niqe(dist[:2]).numpy(), rtol=1e-6)
    np.testing.assert_allclose(niqe(dist[:2].double()).numpy(), niqe(dist[:2]).numpy(), rtol=1e-12, atol=0)
    assert a.dtype == torch.float64 and a.shape == (2,)


def test_rejects_bad_input(dist):
    with pytest.raises(ValueError, match="convention"):
        niqe(dist[:1], convention="skvideo")
    with pytest.raises(ValueError, match="96x96"):
        niqe(dist[:1, :, :100, :150])
    with pytest.raises(ValueError, match="shape"):
        niqe(dist[0])


def test_flat_image_scores_nan_without_spoiling_the_batch(dist):
    x = torch.cat([torch.full_like(dist[:1], 0.5), dist[4:5]])
    for convention in ("pyiqa", "live_computequality"):
        got = niqe(x, convention=convention).numpy()
        assert np.isnan(got[0])
        np.testing.assert_allclose(got[1], niqe(dist[4:5], convention=convention).item(), rtol=1e-12)


@pytest.mark.parametrize("shape", [(10, 2, 96, 96), (1, 1, 400, 400), (3, 1, 97, 1500)])
def test_filter_in_cache_sized_chunks_is_the_plain_ordered_sum(shape):
    """The 7x7 filter runs over a few planes, or bands of rows, at a time on CPU; every output value must be the
    same ordered sum of separately rounded products as one pass over the whole batch gives."""
    from bfr_models.metrics.niqe import _filter7, _window

    x = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 255
    window = _window("pyiqa")
    h, w = shape[-2:]
    padded = torch.nn.functional.pad(x.reshape(-1, 1, h, w), (3, 3, 3, 3), mode="replicate")
    expected = torch.zeros_like(x.reshape(-1, 1, h, w))
    for k, wk in enumerate(window):
        if wk != 0.0:
            i, j = divmod(k, 7)
            expected.add_(padded[..., i:i + h, j:j + w] * wk)
    assert torch.equal(_filter7(x, window), expected.reshape(shape))
