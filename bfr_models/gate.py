"""The pseudo-target quality gate: whether a target is fit to train on (a row per target either way).

Thresholds: ``catalogs/gate/pseudo_targets.yaml`` (:func:`load_gate`), recorded in the stage's index; the
YAML says why each value. Every measure is a column, every failed check a reason in ``gate_reason``:

- noise: Immerkær's noise estimate of the target (0-255, at the prior's working resolution) above
  ``max_noise_sigma``, or above the input's by more than ``max_noise_increase`` -- Gaussian noise leaking
  through the sampler, DR2's small-N failure (dr2_diffbfr.md §6.1, §7 #9);
- fidelity: PSNR of x1/N copies of target and input (MATLAB bicubic, downscaled only) under
  ``min_lowres_psnr`` -- the low band the methods keep by construction, so N is the method's band at the
  prior's resolution (copies of R/N pixels whatever the image size); a down-only copy, not a blurred-up one;
- colour: the shift of the mean (a*, b*) of those x1/N copies in CIE Lab (D65) above ``max_chroma_shift``
  -- a cast or desaturation that PSNR lets through;
- identity: FaceNet cosine(target, input) under ``min_identity`` (only with the facenet_vggface2 weights);
- quality: the no-reference score does not improve (NIQE must drop by ``min_niqe_gain``, MUSIQ when its
  weights are there must rise by ``min_musiq_gain``); a score that cannot be computed is not checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bfr_models.config_files import load_dataclass_yaml
from bfr_models.pseudo_targets import noise_sigma
from bfr_models.resize import matlab_resize

Scorer = Callable[[torch.Tensor], torch.Tensor]
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GateConfig:
    """The gate's thresholds (defaults = catalogs/gate/pseudo_targets.yaml, which says why)."""

    max_noise_sigma: float = 8.0       # noise: absolute limit (0-255)
    max_noise_increase: float = 5.0    # noise: target minus input
    min_lowres_psnr: float = 27.0      # fidelity: x1/N copies, dB
    default_N: int = 8                 # fidelity band for methods without N (polish)
    max_chroma_shift: float = 3.0      # colour: mean (a*, b*) shift of the x1/N copies
    min_identity: float = 0.5          # identity: FaceNet cosine
    min_niqe_gain: float = 0.0         # quality: NIQE(input) - NIQE(target) must exceed this
    min_musiq_gain: float = 0.0        # quality: MUSIQ(target) - MUSIQ(input) must exceed this
    auto_min_pass_rate: float = 0.75   # --auto: a candidate's sample must pass at least this often
    auto_niqe_tolerance: float = 0.5   # --auto: NIQE this close to the best counts as equal: less noise wins
    auto_musiq_tolerance: float = 2.0  # --auto: the same for MUSIQ (0-100)

    def __post_init__(self):
        if self.default_N < 1:
            raise ValueError(f"gate: default_N must be >= 1, got {self.default_N}")
        if not 0 <= self.auto_min_pass_rate <= 1:
            raise ValueError(f"gate: auto_min_pass_rate must be in [0, 1], got {self.auto_min_pass_rate}")

    def auto_tolerance(self, metric: str) -> float:
        return self.auto_musiq_tolerance if metric == "musiq" else self.auto_niqe_tolerance


def default_gate_path() -> Path:
    from bfr_models.choices import catalogs_dir

    return catalogs_dir() / "gate" / "pseudo_targets.yaml"


def load_gate(path: str | Path | None = None) -> GateConfig:
    """The thresholds of a YAML file (default: catalogs/gate/pseudo_targets.yaml); unknown keys are an error."""
    return load_dataclass_yaml(GateConfig, Path(path) if path else default_gate_path(), "gate file")


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65 white) of sRGB images (B, 3, H, W) in [0, 1]."""
    x = x.double().clamp(0, 1)
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    m = torch.tensor([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                      [0.0193339, 0.1191920, 0.9503041]], dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, linear)
    xyz = xyz / torch.tensor([0.95047, 1.0, 1.08883], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], 1)


def chroma_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the distance between the mean (a*, b*) of two batches in CIE Lab: a colour cast or a
    desaturation of the whole image (the colour check of the gate and of the clean stage's acceptance)."""
    return (rgb_to_lab(a)[:, 1:].flatten(2).mean(2) - rgb_to_lab(b)[:, 1:].flatten(2).mean(2)).norm(dim=1)


def lowres_pair(target: torch.Tensor, inputs: torch.Tensor, N: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The x1/N copies (MATLAB bicubic, antialiased, downscaled only) of two same-size batches."""
    size = (max(1, round(target.shape[-2] / N)), max(1, round(target.shape[-1] / N)))
    return matlab_resize(target.double(), size).clamp(0, 1), matlab_resize(inputs.double(), size).clamp(0, 1)


def measure(target: torch.Tensor, inputs: torch.Tensor, N: float, *, noise_target: torch.Tensor | None = None,
            noise_input: torch.Tensor | None = None, niqe: Scorer | None = None, musiq: Scorer | None = None,
            identity: PairScorer | None = None) -> list[dict]:
    """Every measure of the gate per image, for same-size (B, 3, H, W) batches in [0, 1]; the fidelity and
    colour checks compare x1/N copies (N need not be an integer: the band's factor at this image size).

    The noise estimates default to the images given; the pseudo-targets stage passes them measured at the
    prior's working resolution, where an upsampled output cannot hide its noise.
    """
    if target.shape != inputs.shape or target.dim() != 4:
        raise ValueError(f"gate: target and input must be equal (B, 3, H, W) batches, "
                         f"got {tuple(target.shape)} and {tuple(inputs.shape)}")
    small_t, small_i = lowres_pair(target, inputs, N)
    mse = ((small_t - small_i) ** 2).flatten(1).mean(1)
    cols = {"lowres_psnr": (10.0 * torch.log10(1.0 / mse)).tolist(),
            "chroma_shift": chroma_shift(small_t, small_i).tolist(),
            "noise_sigma": (noise_target if noise_target is not None else noise_sigma(target)).tolist(),
            "input_noise_sigma": (noise_input if noise_input is not None else noise_sigma(inputs)).tolist()}
    if niqe is not None:
        cols["input_niqe"], cols["target_niqe"] = niqe(inputs).tolist(), niqe(target).tolist()
    if musiq is not None:
        cols["input_musiq"], cols["target_musiq"] = musiq(inputs).tolist(), musiq(target).tolist()
    if identity is not None:
        cols["identity_cos"] = identity(target, inputs).tolist()
    return [{k: _num(v[b]) for k, v in cols.items()} for b in range(target.shape[0])]


def reasons(rec: dict, config: GateConfig) -> list[str]:
    """The failed checks of one measured record (empty: the target passes)."""
    out = []
    nz, nz_in = rec["noise_sigma"], rec["input_noise_sigma"]
    if nz is None or nz > config.max_noise_sigma:
        out.append(f"noise: sigma {_fmt(nz)} > {config.max_noise_sigma:g}")
    elif nz_in is not None and nz - nz_in > config.max_noise_increase:
        out.append(f"noise: sigma {nz:.2f} exceeds the input's {nz_in:.2f} by more than {config.max_noise_increase:g}")
    lp = rec["lowres_psnr"]
    if lp is not None and lp < config.min_lowres_psnr:  # None: identical x1/N copies (infinite PSNR)
        out.append(f"fidelity: x1/N PSNR {lp:.2f} dB < {config.min_lowres_psnr:g}")
    if rec["chroma_shift"] is None or rec["chroma_shift"] > config.max_chroma_shift:
        out.append(f"colour: chroma shift {_fmt(rec['chroma_shift'])} > {config.max_chroma_shift:g}")
    if "identity_cos" in rec and (rec["identity_cos"] is None or rec["identity_cos"] < config.min_identity):
        out.append(f"identity: cosine {_fmt(rec['identity_cos'])} < {config.min_identity:g}")
    if "target_niqe" in rec and not _gained(rec["input_niqe"], rec["target_niqe"], config.min_niqe_gain, lower=True):
        out.append(f"quality: NIQE not improved ({_fmt(rec['input_niqe'])} -> {_fmt(rec['target_niqe'])})")
    if "target_musiq" in rec and not _gained(rec["input_musiq"], rec["target_musiq"], config.min_musiq_gain, lower=False):
        out.append(f"quality: MUSIQ not improved ({_fmt(rec['input_musiq'])} -> {_fmt(rec['target_musiq'])})")
    return out


def judge(target: torch.Tensor, inputs: torch.Tensor, N: float, config: GateConfig, **scorers) -> list[dict]:
    """:func:`measure` plus ``gate`` ('pass'/'fail') and ``gate_reason`` (None when it passes)."""
    records = measure(target, inputs, N, **scorers)
    for rec in records:
        failed = reasons(rec, config)
        rec["gate"] = "fail" if failed else "pass"
        rec["gate_reason"] = "; ".join(failed) or None
    return records


def _gained(before: float | None, after: float | None, margin: float, lower: bool) -> bool:
    if before is None or after is None:
        return False
    return (before - after if lower else after - before) > margin


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
