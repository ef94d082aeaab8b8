"""Degradation presets: one YAML file per preset in ``<catalogs>/presets/``.

A preset file holds ``description``, ``source``, ``kind`` and the parameters of its kind, plus
optionally ``splits`` (split name -> parameter overrides), ``scales`` (the downsampling
factors the preset is published at) and ``cases`` (a list of parameter overrides; each image is
given one case, drawn from its seed, and its row records ``case`` = 1..n).
``load_preset(name, split, scale)`` resolves one split and one scale into a plain config. A
preset that has splits or scales, loaded without them, can only be described (``describe()``);
its ``config``, ``sample`` and ``apply`` raise PresetError.

Kinds:
  classic     GFPGAN's order (specs/peers_and_ecosystem.md §1.1):
              [hflip] -> blur (random mixed kernel) -> downsample to (int(h // s), int(w // s))
              -> noise -> JPEG -> [resize back to the input size] -> [colour shift] -> [gray]
              -> [torch colour jitter] -> 8-bit rounding.
  camera_raw  the unsupervised-BFR camera-RAW noise model, ``camera_raw.degrade_camera_raw``.

All randomness is drawn in ``sample(seed)`` (numpy, from ``seed``) except the noise fields,
which ``apply`` draws from ``torch.Generator().manual_seed(params["seed"])`` on the CPU: the
same params give the same output bit for bit, alone or in any batch, on a given device; the
noise itself is the same on every device (float rounding in the blur and resizes is not).
Levels (noise sigma, colour shift) are on the 0-255 scale.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from bfr_models.degradations.kernels import KERNEL_TYPES, kernel_from_params, random_kernel_params
from bfr_models.degradations.ops import (
    NOISE_FUNCTIONS,
    RESIZE_MODES,
    blur,
    jitter_colors,
    jpeg,
    quantize_8bit,
    resize,
    shift_colors,
    to_grayscale,
)
from bfr_models.choices import catalogs_dir, list_presets

JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")
_METADATA = ("description", "source", "kind", "splits", "scales", "cases")


class PresetError(ValueError):
    """An unknown preset, split or scale, or a malformed preset file (one line)."""


def presets_dir() -> Path:
    return catalogs_dir() / "presets"


# ------------------------------------------------------------------------- validation


def _number(value, field: str, low: float | None = None, high: float | None = None, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise PresetError(f"{field} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if low is not None and high is not None else \
            f">= {low}" if low is not None else f"<= {high}"
        raise PresetError(f"{field} must be {bounds}, got {value!r}")
    return value


def _range(value, field: str, low: float | None = None, high: float | None = None, integer: bool = False):
    if not isinstance(value, list) or len(value) != 2:
        raise PresetError(f"{field} must be a [low, high] list, got {value!r}")
    a, b = (_number(v, field, low, high, integer) for v in value)
    if a > b:
        raise PresetError(f"{field} must have low <= high, got {value!r}")
    return [a, b]


def _beta_range(value, field: str):
    a, b = _range(value, field, low=1e-3)
    if not a <= 1 <= b:  # BasicSR draws half the betas below 1 and half above
        raise PresetError(f"{field} must contain 1, got {value!r}")
    return [a, b]


def _bool(value, field: str):
    if not isinstance(value, bool):
        raise PresetError(f"{field} must be true or false, got {value!r}")
    return value


def _choice(value, field: str, options):
    if value not in options:
        raise PresetError(f"{field} must be one of {', '.join(options)}, got {value!r}")
    return value


def _names(value, field: str, options):
    if not isinstance(value, list) or not value or any(v not in options for v in value):
        raise PresetError(f"{field} must be a non-empty list of {', '.join(options)}, got {value!r}")
    return value


def _probabilities(value, field: str):
    if not isinstance(value, list) or not value:
        raise PresetError(f"{field} must be a non-empty list of probabilities, got {value!r}")
    probs = [_number(v, field, 0, 1) for v in value]
    if abs(sum(probs) - 1) > 1e-6:
        raise PresetError(f"{field} must sum to 1, got {value!r}")
    return probs


def _odd_int(value, field: str):
    if _number(value, field, 1, None, integer=True) % 2 != 1:
        raise PresetError(f"{field} must be odd, got {value!r}")
    return value


def _scale(value, field: str):
    return _range(value, field, low=1e-3) if isinstance(value, list) else _number(value, field, 1e-3)


_PROB = partial(_number, low=0, high=1)

CLASSIC_SCHEMA = {
    "blur": {
        "kernel_size": _odd_int,
        "kernel_list": partial(_names, options=KERNEL_TYPES),
        "kernel_prob": _probabilities,
        "sigma": partial(_range, low=1e-3),
        "rotation": _range,
        "betag": _beta_range,
        "betap": _beta_range,
    },
    "downsample": {"scale": _scale, "mode": partial(_choice, options=RESIZE_MODES)},
    "noise": {"types": partial(_names, options=tuple(NOISE_FUNCTIONS)), "sigma": partial(_range, low=0),
              "gray_prob": _PROB},
    "jpeg": {"quality": partial(_range, low=0, high=100, integer=True), "inclusive": _bool},
    "resize_back": _bool,
    "resize_back_mode": partial(_choice, options=RESIZE_MODES),
    "hflip": _bool,
    "color_jitter": {"prob": _PROB, "shift": partial(_number, low=0, high=255)},
    "gray_prob": _PROB,
    "color_jitter_pt": {"prob": _PROB, "brightness": partial(_range, low=0), "contrast": partial(_range, low=0),
                        "saturation": partial(_range, low=0), "hue": partial(_range, low=-0.5, high=0.5)},
}
CAMERA_RAW_SCHEMA = {"iso": partial(_range, low=1), "scale": partial(_number, low=1, integer=True)}
SCHEMAS = {"classic": CLASSIC_SCHEMA, "camera_raw": CAMERA_RAW_SCHEMA}


def _validate(value, schema, field: str):
    if not isinstance(schema, dict):
        return schema(value, field)
    if not isinstance(value, dict):
        raise PresetError(f"{field} must be a mapping with keys {', '.join(schema)}, got {value!r}")
    unknown = sorted(set(value) - set(schema))
    missing = [k for k in schema if k not in value]
    if unknown or missing:
        problem = f"unknown field(s) {', '.join(unknown)}" if unknown else f"missing field(s) {', '.join(missing)}"
        raise PresetError(f"{field + ': ' if field else ''}{problem} (expected: {', '.join(schema)})")
    return {k: _validate(value[k], sub, f"{field}.{k}".lstrip(".")) for k, sub in schema.items()}


def _merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _resolve(raw: dict, split: str | None, scale, case: dict | None = None) -> dict:
    """The validated parameters of one split at one scale (scale None: preset without scales), and case."""
    params = {k: v for k, v in raw.items() if k not in _METADATA}
    if split is not None:
        params = _merged(params, raw["splits"][split])
    if case is not None:
        params = _merged(params, case)
    if scale is not None:
        params = _merged(params, {"downsample": {"scale": scale}} if raw["kind"] == "classic" else {"scale": scale})
    config = _validate(params, SCHEMAS[raw["kind"]], "")
    if raw["kind"] == "classic" and len(config["blur"]["kernel_prob"]) != len(config["blur"]["kernel_list"]):
        raise PresetError("blur.kernel_prob must have one probability per kernel_list entry")
    return config


def _read(name: str) -> dict:
    """Read and check a preset file: every split at every scale must resolve."""
    path = presets_dir() / f"{name}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PresetError(f"preset file {path}: cannot read it: {' '.join(str(e).split())}") from None
    try:
        if not isinstance(raw, dict):
            raise PresetError("must be a mapping")
        raw.setdefault("kind", "classic")
        _choice(raw["kind"], "kind", tuple(SCHEMAS))
        for key in ("description", "source"):
            if not isinstance(raw.get(key), str):
                raise PresetError(f"{key} must be a string")
        if "splits" in raw and (not isinstance(raw["splits"], dict) or not raw["splits"]
                                or not all(isinstance(v, dict) for v in raw["splits"].values())):
            raise PresetError("splits must map split names to parameter overrides")
        if "scales" in raw:
            if not isinstance(raw["scales"], list) or not raw["scales"]:
                raise PresetError("scales must be a non-empty list")
            for s in raw["scales"]:
                _scale(s, "scales")
        if "cases" in raw and (not isinstance(raw["cases"], list) or not raw["cases"]
                               or not all(isinstance(c, dict) for c in raw["cases"])):
            raise PresetError("cases must be a non-empty list of parameter overrides")
        for split in raw.get("splits") or [None]:
            for scale in raw.get("scales") or [None]:
                for k, case in enumerate(raw.get("cases") or [None]):
                    try:
                        _resolve(raw, split, scale, case)
                    except PresetError as e:
                        raise PresetError(f"case {k + 1}: {e}" if case is not None else str(e)) from None
    except PresetError as e:
        raise PresetError(f"preset file {path}: {e}") from None
    return raw


# ---------------------------------------------------------------------------- presets


def load_preset(name: str, split: str | None = None, scale: float | None = None) -> "Preset":
    known = list_presets()
    if name not in known:
        raise PresetError(f"unknown preset '{name}' (known: {', '.join(known) or 'none'}; in {presets_dir()})")
    raw = _read(name)
    splits, scales = list(raw.get("splits") or []), raw.get("scales")
    if split is not None and split not in splits:
        valid = f"splits: {', '.join(splits)}" if splits else "it has no splits"
        raise PresetError(f"preset '{name}' has no split '{split}' ({valid})")
    chosen = None
    if scale is not None:
        if not scales:
            raise PresetError(f"preset '{name}' takes no scale: it draws one per image")
        chosen = next((s for s in scales if float(s) == float(scale)), None)
        if chosen is None:
            raise PresetError(f"preset '{name}' has no scale {scale:g} (scales: {', '.join(f'{s:g}' for s in scales)})")
    needs = [f"a split ({', '.join(splits)})" if splits and split is None else "",
             f"a scale ({', '.join(f'{s:g}' for s in scales)})" if scales and chosen is None else ""]
    needs = " and ".join(n for n in needs if n)
    config = None if needs else {"name": name, "split": split, "kind": raw["kind"], **_resolve(raw, split, chosen)}
    if config is not None and raw.get("cases"):
        config["cases"] = [_resolve(raw, split, chosen, case) for case in raw["cases"]]
    return Preset(name=name, split=split, scale=chosen, raw=raw, resolved=config,
                  missing=f"preset '{name}' needs {needs}" if needs else None)


@dataclass(frozen=True, eq=False)
class Preset:
    """One degradation preset, resolved to a split and scale where it has them."""

    name: str
    split: str | None
    scale: float | None
    raw: dict
    resolved: dict | None
    missing: str | None

    def _require(self) -> dict:
        if self.resolved is None:
            raise PresetError(self.missing)
        return self.resolved

    @property
    def config(self) -> dict:
        """The fully resolved parameters (plain, JSON-serialisable): what the output depends on."""
        return copy.deepcopy(self._require())

    def describe(self) -> dict:
        """Parameter ranges, for listing; works without a split or scale."""
        out = {"description": self.raw["description"], "source": self.raw["source"], "kind": self.raw["kind"]}
        if self.resolved is not None:
            out.update(split=self.split, scale=self.scale,
                       parameters={k: v for k, v in self.resolved.items() if k not in ("name", "split", "kind")})
            return out
        scales = self.raw.get("scales")
        if scales:
            out["scales"] = scales

        def body(split):
            params = _resolve(self.raw, split, scales[0] if scales else None)
            if scales:  # the scale is listed once, above
                (params["downsample"] if self.raw["kind"] == "classic" else params).pop("scale")
            return params

        if self.raw.get("splits"):
            out["splits"] = {s: body(s) for s in self.raw["splits"]}
        else:
            out["parameters"] = body(None)
        return out

    def sample(self, seed: int) -> dict:
        """Every random choice for one image, drawn from ``seed`` (JSON-serialisable)."""
        config = self._require()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        rng = np.random.default_rng(int(seed))
        if "cases" in config:  # the image's case first, then its draws within that case
            k = int(rng.integers(len(config["cases"])))
            drawn = {"case": k + 1, **_KINDS[config["kind"]][0](config["cases"][k], rng)}
        else:
            drawn = _KINDS[config["kind"]][0](config, rng)
        return {"preset": self.name, "split": self.split, "seed": int(seed), **drawn}

    def apply(self, images: torch.Tensor, params: list[dict]) -> list[torch.Tensor]:
        """Degrade (B, 3, H, W) float images in [0, 1] with one ``sample()`` dict each; returns
        B tensors (3, h, w) in [0, 1], rounded to 8 bits, on the images' device."""
        config = self._require()
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected float images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(params) != images.shape[0]:
            raise ValueError(f"need one params dict per image: batch {images.shape[0]}, {len(params)} params")
        return _KINDS[config["kind"]][1](config, images.to(torch.float32), params)


# --------------------------------------------------------------------- classic kind


def _sample_classic(config: dict, rng: np.random.Generator) -> dict:
    # Draw order follows GFPGAN's __getitem__: flip, kernel, scale, noise, JPEG, extras.
    b, noise, jitter, jitter_pt = config["blur"], config["noise"], config["color_jitter"], config["color_jitter_pt"]
    out = {"hflip": bool(config["hflip"] and rng.uniform() < 0.5)}
    out.update(random_kernel_params(rng, b["kernel_list"], b["kernel_prob"], b["kernel_size"], b["sigma"], b["sigma"],
                                    b["rotation"], b["betag"], b["betap"]))
    scale = config["downsample"]["scale"]
    out["scale"] = float(rng.uniform(*scale)) if isinstance(scale, list) else float(scale)
    out["noise_type"] = noise["types"][int(rng.integers(len(noise["types"])))]
    out["noise_sigma"] = float(rng.uniform(*noise["sigma"]))
    out["gray_noise"] = bool(noise["gray_prob"] > 0 and rng.uniform() < noise["gray_prob"])
    out["jpeg_quality"] = jpeg_quality(rng, config["jpeg"])
    out["color_shift"] = None
    if jitter["prob"] > 0 and rng.uniform() < jitter["prob"]:
        out["color_shift"] = [float(v) for v in rng.uniform(-jitter["shift"], jitter["shift"], 3)]
    out["gray"] = bool(config["gray_prob"] > 0 and rng.uniform() < config["gray_prob"])
    out["color_jitter"] = None
    if jitter_pt["prob"] > 0 and rng.uniform() < jitter_pt["prob"]:
        order = [JITTER_NAMES[i] for i in rng.permutation(len(JITTER_NAMES))]
        out["color_jitter"] = {"order": order, **{n: float(rng.uniform(*jitter_pt[n])) for n in JITTER_NAMES}}
    return out


def jpeg_quality(rng: np.random.Generator, jpeg_config: dict) -> int:
    """The JPEG quality as each preset's source draws it (``inclusive`` in the preset says which):
    inclusive, a uniform integer of [lo, hi] (DR2's integer set {60 : 80} holds 80); exclusive,
    int(uniform(lo, hi)) as CodeFormer / BasicSR (#578) do, which never draws hi unless lo == hi."""
    lo, hi = jpeg_config["quality"]
    return int(rng.integers(lo, hi + 1)) if jpeg_config["inclusive"] else int(rng.uniform(lo, hi))


def lowres_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """GFPGAN's ``(int(w // scale), int(h // scale))``, as (h, w), at least one pixel."""
    return max(1, int(height // scale)), max(1, int(width // scale))


def _groups(keys: list) -> dict:
    """Indices of equal keys, in first-seen order: images that can share one batched call."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return out


def _add_noise(images: torch.Tensor, params: list[dict]) -> torch.Tensor:
    out = images.clone()
    for noise_type, idx in _groups([p["noise_type"] for p in params]).items():
        chosen = [params[i] for i in idx]
        out[idx] = NOISE_FUNCTIONS[noise_type](
            images[idx], [p["noise_sigma"] for p in chosen],
            [torch.Generator().manual_seed(p["seed"]) for p in chosen], [p["gray_noise"] for p in chosen])
    return out


def _color_extras(image: torch.Tensor, p: dict) -> torch.Tensor:
    if p["color_shift"] is not None:
        image = shift_colors(image[None], [[v / 255.0 for v in p["color_shift"]]])[0]
    if p["gray"]:
        image = to_grayscale(image[None])[0]
    if p["color_jitter"] is not None:
        image = jitter_colors(image, p["color_jitter"]["order"], p["color_jitter"])
    return image


def _apply_classic(config: dict, images: torch.Tensor, params: list[dict]) -> list[torch.Tensor]:
    _, _, height, width = images.shape
    flips = [i for i, p in enumerate(params) if p["hflip"]]
    if flips:
        images = images.clone()
        images[flips] = images[flips].flip(-1)
    kernels = np.stack([kernel_from_params(p["kernel_type"], p["kernel_size"], p["sigma_x"], p["sigma_y"],
                                           p["rotation"], p["beta"]) for p in params])
    blurred = blur(images, kernels)
    out: list[torch.Tensor | None] = [None] * len(params)
    # Images drawn at the same low-res size go through resize/noise/JPEG/resize-back together.
    for size, idx in _groups([lowres_size(height, width, p["scale"]) for p in params]).items():
        chosen = [params[i] for i in idx]
        x = resize(blurred[idx], size, config["downsample"]["mode"])
        x = _add_noise(x, chosen)
        x = jpeg(x, [p["jpeg_quality"] for p in chosen])
        if config["resize_back"]:
            x = resize(x, (height, width), config["resize_back_mode"])
        for j, (i, p) in enumerate(zip(idx, chosen)):
            out[i] = quantize_8bit(_color_extras(x[j], p))
    return out


# ------------------------------------------------------------------ camera-RAW kind


def _sample_camera_raw(config: dict, rng: np.random.Generator) -> dict:
    from bfr_models.degradations.camera_raw import sample_camera_raw_params

    return sample_camera_raw_params(rng, config["iso"], [config["scale"]])


def _apply_camera_raw(config: dict, images: torch.Tensor, params: list[dict]) -> list[torch.Tensor]:
    from bfr_models.degradations.camera_raw import degrade_camera_raw

    generators = [torch.Generator().manual_seed(p["seed"]) for p in params]
    return list(quantize_8bit(degrade_camera_raw(images, params, generators)))


_KINDS = {"classic": (_sample_classic, _apply_classic), "camera_raw": (_sample_camera_raw, _apply_camera_raw)}
