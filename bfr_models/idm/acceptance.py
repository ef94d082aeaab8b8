"""Whether a cleaned image x* = f(x) replaces the original x: spec §9.4's checks (the paper keeps every output).

Thresholds: ``catalogs/acceptance/idm.yaml`` (:func:`load_acceptance`), recorded in the clean stage's
index. Each measure is a column, each failed check a reason:

- A7 sanity: x* is finite;
- A1 identity: FaceNet cosine(x, x*) >= ``min_identity``; when that is None, the threshold is calibrated on
  the set (:func:`calibrate`): the 1st percentile of cosine(x, JPEG_75(x)) over the originals;
- A2 content: (a) LPIPS-VGG(x, x*) on the full images <= ``max_lpips``; (b) PSNR of bicubic x1/8 copies
  of x and x* (downsampled only) >= ``min_lowpass_psnr``; (c) colour: the shift of the mean (a*, b*) in CIE
  Lab of the x1/N copies (MATLAB bicubic, the quality gate's measure) <= ``max_chroma_shift`` -- a cast or
  desaturation that the PSNR lets through;
- A3 quality not worse: NIQE(x*) - NIQE(x) <= ``max_niqe_increase`` and MUSIQ(x*) - MUSIQ(x) >=
  ``min_musiq_change``;
- A4 an image in the worst ``degraded_fraction`` of the set by MUSIQ (by NIQE without MUSIQ) is
  ``degraded`` and must improve: dMUSIQ >= ``degraded_min_musiq_gain`` or dNIQE <= -``degraded_min_niqe_drop``;
  any other image is clean and must pass through nearly unchanged: LPIPS(x, x*) <= ``clean_max_lpips``.

Each failed check also has a short name (``identity``, ``lpips``, ``lf_psnr``, ``colour``, ``niqe``, ``musiq``,
``improvement``, ``near_identity``, ``no_quality``, ``finite``), listed in ``rejected_by`` for the console summary.
A check whose scorer is absent is not made (the flow records the metric as not computed). An image with
no quality score at all (NIQE needs two 96-px blocks, MUSIQ not given) cannot show A3/A4 and is rejected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bfr_models.config_files import load_dataclass_yaml
from bfr_models.gate import chroma_shift, lowres_pair

Scorer = Callable[[torch.Tensor], torch.Tensor]
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DEGRADED_METRICS = {"musiq": "higher", "niqe": "lower"}  # the A4 ranking metric and which way is better


@dataclass(frozen=True)
class AcceptanceConfig:
    """The spec §9.4 thresholds (defaults = the spec's; the YAML in catalogs/acceptance says why)."""

    max_lpips: float = 0.15                # A2(a)
    lowpass_N: int = 8                     # A2(b): x1/N copies
    min_lowpass_psnr: float = 30.0         # A2(b)
    max_chroma_shift: float = 3.0          # A2(c): mean (a*, b*) shift of the x1/N copies
    min_identity: float | None = None      # A1; None: calibrated on the set
    identity_percentile: float = 1.0       # A1 calibration: this percentile of cosine(x, JPEG_q(x))
    identity_jpeg_quality: int = 75
    max_niqe_increase: float = 0.1         # A3
    min_musiq_change: float = -1.0         # A3
    degraded_fraction: float = 0.15        # A4: the worst 15% of the set are "degraded"
    degraded_min_musiq_gain: float = 2.0   # A4 degraded: dMUSIQ >= +2 ...
    degraded_min_niqe_drop: float = 0.3    # ... or dNIQE <= -0.3
    clean_max_lpips: float = 0.05          # A4 clean: near-identity

    def __post_init__(self):
        if self.lowpass_N < 1:
            raise ValueError(f"acceptance: lowpass_N must be >= 1, got {self.lowpass_N}")
        if not 0 <= self.degraded_fraction <= 1:
            raise ValueError(f"acceptance: degraded_fraction must be in [0, 1], got {self.degraded_fraction}")
        if not 0 <= self.identity_percentile <= 100:
            raise ValueError(f"acceptance: identity_percentile must be in [0, 100], got {self.identity_percentile}")
        if not 1 <= self.identity_jpeg_quality <= 100:
            raise ValueError(f"acceptance: identity_jpeg_quality must be in [1, 100], got {self.identity_jpeg_quality}")


def default_acceptance_path() -> Path:
    from bfr_models.choices import catalogs_dir

    return catalogs_dir() / "acceptance" / "idm.yaml"


def load_acceptance(path: str | Path | None = None, **overrides) -> AcceptanceConfig:
    """The thresholds of a YAML file (default: catalogs/acceptance/idm.yaml), then the overrides that are not None."""
    return load_dataclass_yaml(AcceptanceConfig, Path(path) if path else default_acceptance_path(), "acceptance file",
                               **overrides)


@dataclass(frozen=True)
class SetCalibration:
    """The set-level inputs of the per-image rules, computed once from the original images."""

    degraded_metric: str | None = None  # "musiq" or "niqe"; None: no image could be scored
    degraded_cut: float | None = None   # an image this bad or worse is "degraded" (A4)
    min_identity: float | None = None   # A1's threshold: the config's, or calibrated
    images_scored: int = 0


def calibrate(config: AcceptanceConfig, metric: str, quality: Sequence[float],
              jpeg_identity: Sequence[float] = ()) -> SetCalibration:
    """A4's cut: the score below which (MUSIQ; above which for NIQE) lie the worst ``degraded_fraction`` of the
    finite scores (the smallest k with k >= fraction * n, at least one image when the fraction is > 0). A1's
    threshold: ``min_identity`` when set, else the ``identity_percentile``-th percentile of the cosines of
    (x, JPEG_q(x)) (None when there are none)."""
    if metric not in DEGRADED_METRICS:
        raise ValueError(f"acceptance: degraded metric must be one of {', '.join(DEGRADED_METRICS)}, got {metric!r}")
    q = np.asarray([v for v in quality if math.isfinite(v)], dtype=np.float64)
    cut = None
    if len(q) and config.degraded_fraction > 0:
        signed = q if DEGRADED_METRICS[metric] == "higher" else -q
        k = max(1, math.ceil(config.degraded_fraction * len(q) - 1e-9))
        cut = float(np.sort(signed)[k - 1]) * (1 if DEGRADED_METRICS[metric] == "higher" else -1)
    threshold = config.min_identity
    cos = [v for v in jpeg_identity if math.isfinite(v)]
    if threshold is None and cos:
        threshold = float(np.percentile(cos, config.identity_percentile, method="inverted_cdf"))
    return SetCalibration(metric if len(q) else None, cut, threshold, int(len(q)))


def is_degraded(score: float | None, calibration: SetCalibration) -> bool:
    if score is None or calibration.degraded_cut is None:
        return False
    if DEGRADED_METRICS[calibration.degraded_metric] == "higher":
        return score <= calibration.degraded_cut
    return score >= calibration.degraded_cut


def downscaled_psnr(a: torch.Tensor, b: torch.Tensor, N: int) -> torch.Tensor:
    """Per-image PSNR (dB, peak 1) of bicubic x1/N copies of a and b (spec A2b); inf where they are equal.

    Antialiased Keys bicubic (a = -0.5), the family of MATLAB's imresize; torch renormalises the kernel at
    the border where MATLAB pads symmetrically.
    """
    size = (max(1, a.shape[-2] // N), max(1, a.shape[-1] // N))
    small_a, small_b = (F.interpolate(t.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
                        for t in (a, b))
    mse = ((small_a - small_b) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _delta(rec: dict, metric: str) -> float | None:
    before, after = rec.get(f"{metric}_before"), rec.get(f"{metric}_after")
    return None if before is None or after is None else after - before


def judge(x: torch.Tensor, x_star: torch.Tensor, config: AcceptanceConfig, calibration: SetCalibration, *,
          niqe: Scorer | None, musiq: Scorer | None = None, lpips: PairScorer | None = None,
          identity: PairScorer | None = None) -> list[dict]:
    """One record per image of the (B, 3, H, W) batches in [0, 1]: every measure, ``degraded``, ``accepted``
    and ``reasons``. ``niqe`` is None when the images are too small for NIQE; the other scorers are optional."""
    if x.shape != x_star.shape or x.dim() != 4:
        raise ValueError(f"acceptance: x and x* must be equal (B, 3, H, W) batches, "
                         f"got {tuple(x.shape)} and {tuple(x_star.shape)}")
    finite = torch.isfinite(x_star).flatten(1).all(1).tolist()
    x_star = torch.nan_to_num(x_star).clamp(0, 1)
    cols: dict[str, list] = {"lowpass_psnr": downscaled_psnr(x_star, x, config.lowpass_N).tolist(),
                             "chroma_shift": chroma_shift(*lowres_pair(x_star, x, config.lowpass_N)).tolist()}
    if niqe is not None:
        cols["niqe_before"], cols["niqe_after"] = niqe(x).tolist(), niqe(x_star).tolist()
    if musiq is not None:
        cols["musiq_before"], cols["musiq_after"] = musiq(x).tolist(), musiq(x_star).tolist()
    if lpips is not None:
        cols["lpips"] = lpips(x_star, x).tolist()
    if identity is not None:
        cols["identity_cos"] = identity(x_star, x).tolist()
    records = []
    for b in range(x.shape[0]):
        rec = {k: _num(v[b]) for k, v in cols.items()}
        rec["degraded"] = is_degraded(rec.get(f"{calibration.degraded_metric}_before"), calibration)
        failed = [] if finite[b] else [("finite", "x* has non-finite values")]
        failed += _content_reasons(rec, config, calibration)
        failed += _quality_reasons(rec, config, niqe is not None, musiq is not None)
        rec["accepted"] = not failed
        rec["reasons"] = "; ".join(text for _, text in failed) or None
        rec["rejected_by"] = ",".join(check for check, _ in failed) or None
        records.append(rec)
    return records


def _content_reasons(rec: dict, config: AcceptanceConfig, calibration: SetCalibration) -> list[tuple[str, str]]:
    """A1 and A2: identity and content kept, as (check, reason) pairs."""
    reasons = []
    if "identity_cos" in rec and calibration.min_identity is not None and \
            (rec["identity_cos"] is None or rec["identity_cos"] < calibration.min_identity):
        reasons.append(("identity", f"identity similarity {_fmt(rec['identity_cos'])} < {calibration.min_identity:.3f}"))
    if "lpips" in rec and (rec["lpips"] is None or rec["lpips"] > config.max_lpips):
        reasons.append(("lpips", f"LPIPS {_fmt(rec['lpips'])} > {config.max_lpips:g}"))
    lp = rec["lowpass_psnr"]
    if lp is not None and lp < config.min_lowpass_psnr:  # None: identical x1/N copies (infinite PSNR)
        reasons.append(("lf_psnr", f"low-pass PSNR {lp:.2f} dB < {config.min_lowpass_psnr:g}"))
    shift = rec["chroma_shift"]
    if shift is None or shift > config.max_chroma_shift:
        reasons.append(("colour", f"colour: chroma shift {_fmt(shift)} > {config.max_chroma_shift:g} "
                                  f"(mean a*b* of the x1/{config.lowpass_N} copies)"))
    return reasons


def _quality_reasons(rec: dict, config: AcceptanceConfig, has_niqe: bool, has_musiq: bool) -> list[tuple[str, str]]:
    """A3 (not worse) and A4 (degraded: improved; clean: near-identity), as (check, reason) pairs."""
    if not has_niqe and not has_musiq:
        return [("no_quality", "no quality score (NIQE needs two 96-px blocks, MUSIQ not computed): A3/A4 cannot "
                               "be checked")]
    reasons = []
    d_niqe, d_musiq = _delta(rec, "niqe"), _delta(rec, "musiq")
    if has_niqe and (d_niqe is None or d_niqe > config.max_niqe_increase):
        reasons.append(("niqe", f"NIQE worse ({_fmt(rec['niqe_before'])} -> {_fmt(rec['niqe_after'])}, "
                                f"limit +{config.max_niqe_increase:g})"))
    if has_musiq and (d_musiq is None or d_musiq < config.min_musiq_change):
        reasons.append(("musiq", f"MUSIQ worse ({_fmt(rec['musiq_before'])} -> {_fmt(rec['musiq_after'])}, "
                                 f"limit {config.min_musiq_change:+g})"))
    if rec["degraded"]:
        improved = (d_musiq is not None and d_musiq >= config.degraded_min_musiq_gain) or \
                   (d_niqe is not None and d_niqe <= -config.degraded_min_niqe_drop)
        if not improved:
            measured = ([f"dMUSIQ {_fmt(d_musiq)} < +{config.degraded_min_musiq_gain:g}"] if has_musiq else []) + \
                       ([f"dNIQE {_fmt(d_niqe)} > -{config.degraded_min_niqe_drop:g}"] if has_niqe else [])
            reasons.append(("improvement", f"degraded image not improved ({' and '.join(measured)})"))
    elif "lpips" in rec and rec["lpips"] is not None and rec["lpips"] > config.clean_max_lpips:
        reasons.append(("near_identity", f"clean image changed: LPIPS {_fmt(rec['lpips'])} > "
                                         f"{config.clean_max_lpips:g} (near-identity)"))
    return reasons


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
