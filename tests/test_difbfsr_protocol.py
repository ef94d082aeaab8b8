"""The difbfsr-gaussian8 preset (DifBFSR's x4 test protocol): the 8 cases, one per image, recorded."""

import json

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
