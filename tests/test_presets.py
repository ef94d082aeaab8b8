"""Degradation presets: the YAML ranges against the specs, resolution and errors, sampling and
batched application."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from bfr_models.degradations import PresetError, list_presets, load_preset
from bfr_models.degradations.presets import jpeg_quality, lowres_size
from bfr_models.imageio import encode_png
from tasks.rows import to_uint8
from tests.conftest import face_like

PI = [-math.pi, math.pi]

# The spec tables (peers_and_ecosystem.md §1.1, idm_cleaning.md §4.1, dr2_diffbfr.md §1.2/§1.4),
# typed in again here: (blur sigma, downsample, noise sigma, JPEG q, color_jitter, jitter_pt, gray).
SPEC = {
    ("gfpgan", None): ([0.1, 10], [0.8, 8], [0, 20], [60, 100], 0.3, 0.3, 0.01),
    ("diffbfr", None): ([0.1, 10], [0.8, 8], [0, 20], [60, 100], 0.0, 0.0, 0.01),
    ("codeformer_stage2", None): ([1, 15], [4, 30], [0, 20], [30, 80], 0.0, 0.0, 0.0),
    ("codeformer_stage3", "small"): ([0.1, 10], [1, 12], [0, 15], [60, 100], 0.0, 0.0, 0.0),
    ("codeformer_stage3", "large"): ([1, 15], [4, 30], [0, 20], [30, 80], 0.0, 0.0, 0.0),
    ("difface", None): ([0.1, 15], [0.8, 32], [0, 20], [30, 100], 0.0, 0.0, 0.01),
    ("dt_bfr_swinir", None): ([0.1, 15], [0.8, 32], [0, 20], [30, 100], 0.0, 0.0, 0.01),
    ("diffbir", None): ([0.1, 12], [1, 12], [0, 15], [30, 100], 0.0, 0.0, 0.0),
    ("idm", None): ([0.2, 10], [1, 8], [0, 15], [50, 100], 0.0, 0.0, 0.01),
}
DR2 = {"mild": ([3, 5], [5, 20], [60, 80]), "medium": ([5, 7], [15, 40], [40, 60]),
       "severe": ([7, 9], [25, 50], [30, 40])}


def _faces(n: int = 4, size: int = 64, width: int | None = None) -> torch.Tensor:
    faces = [face_like(i, size) for i in range(n)]
    if width is not None:
        faces = [cv2.resize(f, (width, size), interpolation=cv2.INTER_AREA) for f in faces]
    return torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture
def custom_catalog(tmp_path, monkeypatch):
    """Write presets into a private catalog: ``write(name, text_or_dict)``."""
    folder = tmp_path / "catalogs" / "presets"
    folder.mkdir(parents=True)
    monkeypatch.setenv("BFR_CURATE_CATALOGS", str(tmp_path / "catalogs"))

    def write(name: str, content) -> None:
        (folder / f"{name}.yaml").write_text(content if isinstance(content, str) else yaml.safe_dump(content))

    return write


def _shipped(name: str = "gfpgan") -> dict:
    """A preset file as shipped in the repository (not the private catalog)."""
    return yaml.safe_load((Path(__file__).resolve().parents[1] / f"catalogs/presets/{name}.yaml").read_text())


# ------------------------------------------------------------------ ranges and loading


def test_list_presets():
    assert set(list_presets()) == {"gfpgan", "codeformer_stage2", "codeformer_stage3", "difface", "diffbir",
                                   "dt_bfr_swinir", "dr2", "diffbfr", "idm", "idm_noise", "camera_raw", "difbfsr-gaussian8"}


@pytest.mark.parametrize("name,split", list(SPEC))
def test_classic_preset_ranges_are_the_specs(name, split):
    sigma, down, noise, quality, jitter, jitter_pt, gray = SPEC[(name, split)]
    c = load_preset(name, split).config
    assert c["name"] == name and c["split"] == split and c["kind"] == "classic"
    assert c["blur"] == {"kernel_size": 41, "kernel_list": ["iso", "aniso"], "kernel_prob": [0.5, 0.5],
                         "sigma": sigma, "rotation": PI, "betag": [0.5, 8], "betap": [0.5, 8]}
    assert c["downsample"] == {"scale": down, "mode": "bilinear"}
    assert c["noise"] == {"types": ["gaussian"], "sigma": noise, "gray_prob": 0.0}
    assert c["jpeg"] == {"quality": quality, "inclusive": False}  # int(uniform(lo, hi)) in all these sources
    assert c["resize_back"] is True and c["resize_back_mode"] == "bilinear" and c["hflip"] is False
    assert c["color_jitter"] == {"prob": jitter, "shift": 20}
    assert c["color_jitter_pt"] == {"prob": jitter_pt, "brightness": [0.5, 1.5], "contrast": [0.5, 1.5],
                                    "saturation": [0, 1.5], "hue": [-0.1, 0.1]}
    assert c["gray_prob"] == gray
    assert json.loads(json.dumps(c)) == c


@pytest.mark.parametrize("split", DR2)
@pytest.mark.parametrize("scale", [4, 8, 16])
def test_dr2_splits_and_scales(split, scale):
    sigma, delta, quality = DR2[split]
    c = load_preset("dr2", split, float(scale)).config
    assert c["blur"]["sigma"] == sigma and c["blur"]["kernel_list"] == ["iso"]
    assert c["downsample"] == {"scale": scale, "mode": "bicubic"}
    assert c["noise"] == {"types": ["gaussian", "laplace", "poisson"], "sigma": delta, "gray_prob": 0.0}
    assert c["jpeg"] == {"quality": quality, "inclusive": True} and c["resize_back"] is True


def test_camera_raw_splits_and_scales():
    for split, iso in (("mild", 800), ("moderate", 1500), ("severe", 3000)):
        for scale in (4, 8):
            assert load_preset("camera_raw", split, scale).config == {
                "name": "camera_raw", "split": split, "kind": "camera_raw", "iso": [iso, iso], "scale": scale}


def test_every_preset_describes_itself_without_a_split():
    for name in list_presets():
        d = load_preset(name).describe()
        assert json.loads(json.dumps(d)) == d and d["description"] and d["source"]
    dr2 = load_preset("dr2").describe()
    assert dr2["scales"] == [4, 8, 16] and list(dr2["splits"]) == ["mild", "medium", "severe"]
    assert dr2["splits"]["severe"]["blur"]["sigma"] == [7, 9] and "scale" not in dr2["splits"]["mild"]["downsample"]
    assert load_preset("gfpgan").describe()["parameters"]["downsample"]["scale"] == [0.8, 8]


@pytest.mark.parametrize("args,needle", [
    (("nope",), "unknown preset 'nope' (known: camera_raw, codeformer_stage2"),
    (("dr2", "hard", 4), "no split 'hard' (splits: mild, medium, severe)"),
    (("dr2", "mild", 5), "no scale 5 (scales: 4, 8, 16)"),
    (("gfpgan", "small"), "no split 'small' (it has no splits)"),
    (("gfpgan", None, 4), "preset 'gfpgan' takes no scale: it draws one per image"),
    (("codeformer_stage3", "small", 4), "preset 'codeformer_stage3' takes no scale"),
])
def test_unknown_preset_split_or_scale_is_one_clear_line(args, needle):
    with pytest.raises(PresetError) as e:
        load_preset(*args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_split_preset_without_its_split_fails_at_config_sample_and_apply():
    preset = load_preset("dr2", "mild")
    for use in (lambda: preset.config, lambda: preset.sample(0), lambda: preset.apply(_faces(1), [{}])):
        with pytest.raises(PresetError, match=r"^preset 'dr2' needs a scale \(4, 8, 16\)$"):
            use()
    with pytest.raises(PresetError, match="needs a split .mild, medium, severe. and a scale"):
        load_preset("dr2").config
    with pytest.raises(PresetError, match="needs a split .small, large.$"):
        load_preset("codeformer_stage3").sample(1)


@pytest.mark.parametrize("change,needle", [
    ("blur:\n  [unclosed", "cannot read it"),
    ({"noise": {"types": ["gaussian"], "sigma": [20, 0], "gray_prob": 0.0}}, "noise.sigma must have low <= high"),
    ({"noise": {"types": ["speckle"], "sigma": [0, 5], "gray_prob": 0.0}}, "noise.types must be a non-empty list of"),
    ({"jpeg": {"quality": [60.5, 100], "inclusive": False}}, "jpeg.quality must be an integer"),
    ({"jpeg": {"qualty": [60, 100], "inclusive": False}}, "jpeg: unknown field(s) qualty (expected: quality, inclusive)"),
    ({"jpeg": {"quality": [60, 100]}}, "jpeg: missing field(s) inclusive"),
    ({"gray_prob": 1.5}, "gray_prob must be in [0, 1]"),
    ({"blur_extra": 1}, ".yaml: unknown field(s) blur_extra (expected: blur, downsample,"),
    ({"noise": {"types": ["gaussian"], "sigma": [-1, 5], "gray_prob": 0.0}}, "noise.sigma must be >= 0, got -1"),
    ({"kind": "fancy"}, "kind must be one of classic, camera_raw"),
    ({"splits": {"a": {"blur": {"kernel_size": 40}}}}, "blur.kernel_size must be odd"),
    ({"resize_back": "yes"}, "resize_back must be true or false"),
])
def test_a_malformed_preset_file_is_one_clear_line(custom_catalog, change, needle):
    if isinstance(change, str):
        custom_catalog("broken", change)
    else:
        custom_catalog("broken", {**_shipped(), **change})
    with pytest.raises(PresetError) as e:
        load_preset("broken")
    message = str(e.value)
    assert needle in message and "\n" not in message and "broken.yaml" in message


def test_a_missing_field_and_bad_kernel_probs_are_reported(custom_catalog):
    raw = _shipped()
    del raw["hflip"]
    custom_catalog("nohflip", raw)
    with pytest.raises(PresetError, match=r"missing field\(s\) hflip"):
        load_preset("nohflip")
    raw = _shipped()
    raw["blur"]["kernel_prob"] = [0.5, 0.4]
    custom_catalog("badprob", raw)
    with pytest.raises(PresetError, match="blur.kernel_prob must sum to 1"):
        load_preset("badprob")


# ----------------------------------------------------------------------------- sampling


def test_sample_records_every_parameter_and_is_deterministic():
    preset = load_preset("gfpgan")
    p = preset.sample(123)
    assert json.loads(json.dumps(p)) == p
    assert set(p) == {"preset", "split", "seed", "hflip", "kernel_type", "kernel_size", "sigma_x", "sigma_y",
                      "rotation", "beta", "scale", "noise_type", "noise_sigma", "gray_noise", "jpeg_quality",
                      "color_shift", "gray", "color_jitter"}
    assert p["seed"] == 123 and p["kernel_size"] == 41 and p["preset"] == "gfpgan"
    assert preset.sample(123) == p and preset.sample(124) != p
    with pytest.raises(ValueError, match="seed"):
        preset.sample(-1)


def test_samples_stay_in_the_preset_ranges():
    preset = load_preset("gfpgan")
    ps = [preset.sample(s) for s in range(400)]
    assert all(0.1 <= p["sigma_x"] <= 10 and 0.1 <= p["sigma_y"] <= 10 and -math.pi <= p["rotation"] <= math.pi
               for p in ps)
    assert all(0.8 <= p["scale"] <= 8 and 0 <= p["noise_sigma"] <= 20 for p in ps)
    assert all(type(p["jpeg_quality"]) is int and 60 <= p["jpeg_quality"] < 100 for p in ps)
    assert {p["kernel_type"] for p in ps} == {"iso", "aniso"} and not any(p["hflip"] or p["gray_noise"] for p in ps)
    shifts = [p["color_shift"] for p in ps if p["color_shift"] is not None]
    assert 0.22 < len(shifts) / 400 < 0.38 and all(abs(v) <= 20 for s in shifts for v in s)
    jitters = [p["color_jitter"] for p in ps if p["color_jitter"] is not None]
    assert 0.22 < len(jitters) / 400 < 0.38
    assert all(sorted(j["order"]) == ["brightness", "contrast", "hue", "saturation"] and
               0.5 <= j["brightness"] <= 1.5 and 0 <= j["saturation"] <= 1.5 and -0.1 <= j["hue"] <= 0.1
               for j in jitters)
    dr2 = [load_preset("dr2", "severe", 16).sample(s) for s in range(300)]
    assert {p["noise_type"] for p in dr2} == {"gaussian", "laplace", "poisson"}
    assert all(p["scale"] == 16 and 7 <= p["sigma_x"] <= 9 and p["sigma_y"] == p["sigma_x"] and
               25 <= p["noise_sigma"] <= 50 and 30 <= p["jpeg_quality"] <= 40 for p in dr2)


def test_jpeg_top_quality_is_drawn_only_where_the_source_includes_it():
    """DR2's {30 : 40} holds 40 (inclusive); GFPGAN's int(uniform(60, 100)) never reaches 100."""
    rng = np.random.default_rng(0)
    inclusive = [jpeg_quality(rng, {"quality": [30, 33], "inclusive": True}) for _ in range(200)]
    exclusive = [jpeg_quality(rng, {"quality": [30, 33], "inclusive": False}) for _ in range(200)]
    assert set(inclusive) == {30, 31, 32, 33} and set(exclusive) == {30, 31, 32}
    dr2 = {load_preset("dr2", "severe", 4).sample(s)["jpeg_quality"] for s in range(200)}
    gfpgan = {load_preset("gfpgan").sample(s)["jpeg_quality"] for s in range(400)}
    assert 40 in dr2 and max(gfpgan) == 99


# ----------------------------------------------------------------------------- applying


def test_output_sizes_follow_the_scale_then_resize_back(custom_catalog):
    images = _faces(4, 48, width=64)
    raw = _shipped()
    custom_catalog("gfpgan", raw)
    custom_catalog("gfpgan_lowres", {**raw, "resize_back": False})
    preset = load_preset("gfpgan_lowres")
    params = [preset.sample(s) for s in range(4)]
    for p, out in zip(params, preset.apply(images, params)):  # (int(h // scale), int(w // scale))
        assert tuple(out.shape) == (3, int(48 // p["scale"]), int(64 // p["scale"]))
    assert all(tuple(o.shape) == (3, 48, 64) for o in load_preset("gfpgan").apply(images, params))
    assert lowres_size(512, 512, 0.8) == (639, 639)  # Python's float floor, as GFPGAN's int(w // scale)
    assert lowres_size(20, 20, 30.0) == (1, 1)


def test_dr2_resize_back_option(custom_catalog):
    raw = _shipped("dr2")
    custom_catalog("dr2_small", {**raw, "resize_back": False})
    custom_catalog("dr2", raw)
    images = _faces(2, 64)
    for scale, side in ((4, 16), (8, 8), (16, 4)):
        preset = load_preset("dr2_small", "medium", scale)
        params = [preset.sample(s) for s in range(2)]
        assert [tuple(o.shape) for o in preset.apply(images, params)] == [(3, side, side)] * 2
        assert [tuple(o.shape) for o in load_preset("dr2", "medium", scale).apply(images, params)] == [(3, 64, 64)] * 2


def _variants(name: str) -> list:
    """Every (split, scale) a shipped preset can be applied with."""
    raw = load_preset(name).raw
    return [(split, scale) for split in (raw.get("splits") or [None]) for scale in (raw.get("scales") or [None])]


def _png(image: torch.Tensor) -> bytes:
    """What a user gets on disk for one degraded image."""
    return encode_png(to_uint8(image))


@pytest.mark.parametrize("name", list_presets())
def test_an_images_bytes_do_not_depend_on_its_batch(name):
    """The contract users see, on every split and scale of every shipped preset: the PNG bytes of an
    image degraded alone equal its bytes inside batches of 2 and 5, whatever its companions; and
    the result is 8-bit and seeded (other seeds, other bytes)."""
    images = _faces(5, 32)
    for split, scale in _variants(name):
        preset = load_preset(name, split, scale)
        params = [preset.sample(s) for s in (11, 12, 13, 14, 15)]
        alone = [_png(preset.apply(images[i : i + 1], params[i : i + 1])[0]) for i in range(5)]
        for idx in ([0, 1, 2, 3, 4], [3, 0], [1, 4], [4, 2]):
            outs = preset.apply(images[idx], [params[i] for i in idx])
            assert all(torch.equal(o, (o * 255).round() / 255) for o in outs)
            assert [_png(o) for o in outs] == [alone[i] for i in idx], (name, split, scale, idx)
        other = preset.apply(images, [preset.sample(s) for s in (21, 22, 23, 24, 25)])
        assert [_png(o) for o in other] != alone


def test_noise_is_drawn_from_the_params_seed():
    preset = load_preset("dr2", "mild", 4)
    images = _faces(1)
    p = preset.sample(5)
    outs = [preset.apply(images, [{**p, "seed": s}])[0] for s in (5, 5, 6)]
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_classic_pipeline_matches_basicsr_and_opencv_without_noise():
    """With noise off, apply() is GFPGAN's chain: basicsr kernel, cv2.filter2D, cv2.resize,
    int-quality JPEG, cv2.resize back, round to 8 bits."""
    from basicsr.data import degradations as bd

    preset = load_preset("gfpgan")
    images = _faces(3, 64)
    params = [{**preset.sample(s), "noise_sigma": 0.0, "color_shift": None, "gray": False, "color_jitter": None}
              for s in (1, 2, 3)]
    for img, p, ours in zip(images, params, preset.apply(images, params)):
        bgr = img.permute(1, 2, 0).numpy()[..., ::-1].copy()
        kernel = bd.bivariate_Gaussian(41, p["sigma_x"], p["sigma_y"], p["rotation"], isotropic=p["kernel_type"] == "iso")
        lq = cv2.filter2D(bgr, -1, kernel)
        lq = cv2.resize(lq, (int(64 // p["scale"]), int(64 // p["scale"])), interpolation=cv2.INTER_LINEAR)
        lq = bd.add_jpg_compression(lq, int(p["jpeg_quality"]))
        lq = cv2.resize(lq, (64, 64), interpolation=cv2.INTER_LINEAR)
        ref = np.clip((lq[..., ::-1] * 255).round(), 0, 255)
        diff = np.abs(ours.permute(1, 2, 0).numpy() * 255 - ref)
        # float rounding (FFT vs OpenCV's filter) may flip a rare 8-bit value by one level
        assert (diff == 0).mean() > 0.99 and diff.max() <= 1


def test_extras_hflip_gray_and_color_shift(custom_catalog):
    raw = _shipped()
    custom_catalog("flipgray", {**raw, "hflip": True, "gray_prob": 1.0})
    preset = load_preset("flipgray")
    images = _faces(2)
    params = [preset.sample(s) for s in range(20)]
    assert 4 < sum(p["hflip"] for p in params) < 16 and all(p["gray"] for p in params)
    p = {**params[0], "color_shift": None, "color_jitter": None}
    flipped, plain = ({**p, "hflip": True}, {**p, "hflip": False})
    out = preset.apply(images[:1], [flipped])[0]
    assert torch.equal(out, preset.apply(images[:1].flip(-1), [plain])[0])  # flip happens first
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # gray
    shifted = preset.apply(images[:1], [{**plain, "gray": False, "color_shift": [20.0, -20.0, 0.0]}])[0]
    base = preset.apply(images[:1], [{**plain, "gray": False}])[0]
    assert (shifted[0] - base[0]).mean() > 15 / 255 and (shifted[1] - base[1]).mean() < -15 / 255


def test_apply_checks_its_inputs():
    preset = load_preset("gfpgan")
    with pytest.raises(ValueError, match="one params dict per image"):
        preset.apply(_faces(2), [preset.sample(0)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        preset.apply(torch.zeros(1, 1, 8, 8), [preset.sample(0)])


def test_camera_raw_preset_dispatches_to_the_camera_raw_model():
    pytest.importorskip("bfr_models.degradations.camera_raw")
    preset = load_preset("camera_raw", "moderate", 4)
    params = [preset.sample(s) for s in range(3)]
    assert all(p["iso"] == 1500 and p["scale"] == 4 and p["seed"] == s for s, p in enumerate(params))
    assert json.loads(json.dumps(params)) == params
    images = _faces(3)
    outs = preset.apply(images, params)
    assert [tuple(o.shape) for o in outs] == [(3, 64, 64)] * 3
    assert all(torch.equal(o, (o * 255).round() / 255) for o in outs)
    assert torch.equal(preset.apply(images[1:2], params[1:2])[0], outs[1])
    assert not torch.equal(outs[0], images[0])
