"""The difbfsr-gaussian8 preset (DifBFSR's x4 test protocol): the 8 cases, one per image, recorded."""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from bfr_models import manifest, storage
from bfr_models.degradations import load_preset
from bfr_models.degradations.kernels import gaussian_kernel
from bfr_models.degradations.ops import blur, resize
from bfr_models.imageio import decode_rgb
from flows.degrade import degrade_flow
from tests.conftest import face_like, write_png

# difbfsr.md §2.3: case -> (blur sigma, noise sigma on 0-255, JPEG quality), hard -> easy
SPEC_CASES = {1: (3.2, 30.00, 50), 2: (3.0, 25.71, 57), 3: (2.8, 21.43, 64), 4: (2.6, 17.14, 71),
              5: (2.4, 12.86, 79), 6: (2.2, 8.57, 86), 7: (2.0, 4.29, 93), 8: (1.8, 0.00, 100)}


def test_cases_are_the_spec_schedule_and_deterministic():
    preset = load_preset("difbfsr-gaussian8")
    seen = {}
    for seed in range(200):
        d = preset.sample(seed)
        assert d == preset.sample(seed)
        assert (d["sigma_x"], d["sigma_y"], d["noise_sigma"], d["jpeg_quality"]) == (
            SPEC_CASES[d["case"]][0], SPEC_CASES[d["case"]][0], *SPEC_CASES[d["case"]][1:])
        assert d["kernel_type"] == "iso" and d["kernel_size"] == 21 and d["scale"] == 4 and d["noise_type"] == "gaussian"
        seen[d["case"]] = seen.get(d["case"], 0) + 1
    assert sorted(seen) == list(range(1, 9))  # every case occurs


def test_degrade_records_the_case_and_stores_the_lr(tmp_path):
    folder = tmp_path / "hq"
    for i in range(16):
        write_png(folder / f"face_{i:02d}.png", face_like(i, size=64))
    uri = degrade_flow(input=str(folder), out=str(tmp_path / "run"), preset="difbfsr-gaussian8", device="cpu")
    df = manifest.read_manifest(uri)
    assert (df["status"] == "ok").all() and len(df) == 16
    cases = set()
    for row in df.itertuples():
        params = json.loads(row.params)
        assert row.split == f"difbfsr-gaussian8/case{params['case']}"
        cases.add(params["case"])
        assert decode_rgb(storage.read_bytes(row.uri))[0].shape == (16, 16, 3)  # 64 / 4, not resized back
    assert len(cases) >= 4


def test_the_noise_free_case_is_blur_then_bicubic_x4():
    preset = load_preset("difbfsr-gaussian8")
    seed = next(s for s in range(1000) if preset.sample(s)["case"] == 8)
    params = preset.sample(seed)
    hq = torch.from_numpy(face_like(3, size=64)).permute(2, 0, 1)[None].float() / 255
    ours = preset.apply(hq, [params])[0]
    expected = resize(blur(hq, np.stack([gaussian_kernel(21, 1.8, 1.8, 0.0)])), (16, 16), "bicubic")[0].clamp(0, 1)
    # JPEG at quality 100 and 8-bit rounding are the only other steps
    assert (ours - expected).abs().mean() < 2 / 255


def _nrqm_model(path, forests=(1.5, 2.0, 4.0), linear=(0.5, 1.0, 0.25, 0.5)):
    """An NRQM_model.mat of pyiqa's structure whose forests are single leaves: NRQM is then a constant,
    linear[0] + sum(linear[i + 1] * forests[i])."""
    import scipy.io

    cells = np.empty((1, 3), dtype=object)
    for i, value in enumerate(forests):
        one, index = np.ones((1, 2)), np.ones((1, 2), dtype=np.int32)  # one node, two trees
        cells[0, i] = {"ldau": index * 0, "rdau": index * 0, "a": one, "b": one, "threshold": one,
                       "pred": one * value, "attr": index}
    scipy.io.savemat(path, {"model": {"linear": np.array(linear, dtype=float).reshape(4, 1), "rf": cells}})
    return linear[0] + sum(w * f for w, f in zip(linear[1:], forests))


def test_nrqm_and_pi_through_pyiqa_with_a_local_model_file(tmp_path, monkeypatch):
    from bfr_models.metrics.ma import MaMetrics
    from bfr_models.metrics.suite import MetricSuite, ScoreConfig
    from tests.conftest import install_models

    expected = _nrqm_model(tmp_path / "NRQM_model.mat")  # 0.5 + 1.5 + 0.5 + 2.0 = 4.5
    install_models(monkeypatch, tmp_path, {"nrqm_pyiqa": (tmp_path / "NRQM_model.mat").read_bytes()})
    leftovers = lambda: set(Path(tempfile.gettempdir()).glob("bfr-curate-niqe-*"))  # noqa: E731
    before = leftovers()
    ma = MaMetrics(tmp_path / "NRQM_model.mat")
    assert leftovers() <= before  # the pristine-model .mat written for pyiqa's NIQE is gone once NIQE is built
    images = torch.from_numpy(np.stack([face_like(i, size=192) for i in range(2)])).permute(0, 3, 1, 2).float() / 255
    scores = ma(images, ("nrqm", "pi"))
    assert torch.allclose(scores["nrqm"].double(), torch.full((2,), expected, dtype=torch.float64))
    niqe = torch.stack([ma._pi_niqe(images[i : i + 1]).reshape(()) for i in range(2)]).double()
    assert torch.allclose(scores["pi"].double(), 0.5 * (10 - expected + niqe), atol=1e-6)
    suite = MetricSuite(ScoreConfig(("nrqm",)), torch.device("cpu"))  # the suite reads the card's file
    assert suite.metrics == ("nrqm",)


def test_pi_and_nrqm_without_weights_are_reported_not_computed(tmp_path):
    from flows.score import plan_score

    folder = tmp_path / "imgs"
    for i in range(2):
        write_png(folder / f"f{i}.png", face_like(i, size=192))
    _, _, skip, not_computed = plan_score(str(folder), "niqe,nrqm,pi", None, None, "pyiqa", 0, False, "vgg", "clean",
                                          skip_missing=True)
    assert set(skip) == {"nrqm", "pi"}
    assert {r["command"] for r in not_computed} == {"bfr-curate models pull nrqm_pyiqa"}
    import pytest

    from bfr_models.models import ModelMissingError

    with pytest.raises(ModelMissingError, match="nrqm_pyiqa"):
        plan_score(str(folder), "pi", None, None, "pyiqa", 0, False, "vgg", "clean", skip_missing=False)


def test_report_gives_the_papers_table_1_layout():
    import pandas as pd

    from bfr_models.report import DIFBFSR_TABLE1, ScoredSet, protocol_table, render_report

    rows = [{"image_id": f"i{k}{j}", "uri": None, "status": "ok", "stage": "score",
             "split": f"difbfsr-gaussian8/case{k}", "psnr": 20.0 + k + j, "ssim": 0.5, "niqe": 6.0}
            for k in range(1, 9) for j in (0, 1)]
    frame = pd.DataFrame(rows)
    table = protocol_table(frame, {"fid": 90.0})
    assert list(table.index[:8]) == [f"case {k}" for k in range(1, 9)]
    assert table.loc["case 3", "psnr"] == 23.5
    assert table.loc["mean over cases", "psnr"] == np.mean([20.5 + k for k in range(1, 9)])
    assert table.loc["mean over cases", "fid"] == 90.0 and np.isnan(table.loc["mean over cases", "lpips"])
    assert table.loc["DifBFSR (paper, Table 1)"].to_dict() == DIFBFSR_TABLE1
    html = render_report([ScoredSet("targets", frame, {"set_metrics": {"fid": 90.0}})])
    assert "DifBFSR protocol (Table 1 layout)" in html and "25.27" in html and "not computed" in html
    assert protocol_table(frame.assign(split="gfpgan")) is None
