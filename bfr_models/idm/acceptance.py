"""Whether a cleaned image x* = f(x) replaces the original x (spec §9.4; the paper itself keeps every output).

Checks, each recorded as a column, each failing one as a reason:

- quality improves: NIQE(x*) < NIQE(x) (lower is better), and MUSIQ(x*) > MUSIQ(x) when a MUSIQ scorer is
  given. An image too small for NIQE (< 2 blocks of 96 px) cannot show an improvement and is rejected;
- content kept: PSNR of the low-pass copies Φ_N(x*) vs Φ_N(x) >= ``min_lowpass_psnr`` (N = 8: bicubic
  x1/8, spec A2b), and their LPIPS <= ``max_lowpass_lpips`` when an LPIPS scorer is given;
- identity kept: cosine similarity of face embeddings >= ``min_identity`` when a face-recognition
  model is given;
- sanity: x* is finite.

Rejected images keep the original; the reasons say why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from bfr_models.diffusion.lowpass import lowpass
from bfr_models.pseudo_targets import lowfreq_psnr

Scorer = Callable[[torch.Tensor], torch.Tensor]
PairScorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AcceptanceConfig:
    lowpass_N: int = 8
    min_lowpass_psnr: float = 30.0   # spec A2(b)
    max_lowpass_lpips: float = 0.15  # spec A2(a)'s limit, applied to the low-pass copies
    min_identity: float = 0.85       # spec A1
    min_niqe_gain: float = 0.0       # NIQE must drop by more than this

    def __post_init__(self):
        if self.lowpass_N < 1:
            raise ValueError(f"acceptance: lowpass_N must be >= 1, got {self.lowpass_N}")


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def judge(x: torch.Tensor, x_star: torch.Tensor, config: AcceptanceConfig, *, niqe: Scorer | None,
          musiq: Scorer | None = None, lpips: PairScorer | None = None,
          identity: PairScorer | None = None) -> list[dict]:
    """One record per image of the (B, 3, H, W) batches in [0, 1]: every measure, ``accepted`` and ``reasons``.

    ``niqe`` is None when the images are too small for NIQE; the other scorers are optional.
    """
    if x.shape != x_star.shape or x.dim() != 4:
        raise ValueError(f"acceptance: x and x* must be equal (B, 3, H, W) batches, got {tuple(x.shape)} and {tuple(x_star.shape)}")
    finite = torch.isfinite(x_star).flatten(1).all(1).tolist()
    x_star = torch.nan_to_num(x_star).clamp(0, 1)
    cols: dict[str, list] = {"lowpass_psnr": lowfreq_psnr(x_star, x, config.lowpass_N).tolist()}
    if niqe is not None:
        cols["niqe_before"], cols["niqe_after"] = niqe(x).tolist(), niqe(x_star).tolist()
    if musiq is not None:
        cols["musiq_before"], cols["musiq_after"] = musiq(x).tolist(), musiq(x_star).tolist()
    if lpips is not None:
        N = config.lowpass_N
        cols["lowpass_lpips"] = lpips(lowpass(x_star, N).clamp(0, 1), lowpass(x, N).clamp(0, 1)).tolist()
    if identity is not None:
        cols["identity_cos"] = identity(x_star, x).tolist()
    records = []
    for b in range(x.shape[0]):
        rec = {k: _num(v[b]) for k, v in cols.items()}
        reasons = []
        if not finite[b]:
            reasons.append("x* has non-finite values")
        if niqe is None:
            reasons.append("NIQE undefined (image smaller than two 96-px blocks): no improvement to show")
        else:
            before, after = rec["niqe_before"], rec["niqe_after"]
            if before is None or after is None or not after < before - config.min_niqe_gain:
                reasons.append(f"NIQE not improved ({_fmt(before)} -> {_fmt(after)})")
        if musiq is not None:
            before, after = rec["musiq_before"], rec["musiq_after"]
            if before is None or after is None or not after > before:
                reasons.append(f"MUSIQ not improved ({_fmt(before)} -> {_fmt(after)})")
        lp = rec["lowpass_psnr"]
        if lp is not None and lp < config.min_lowpass_psnr:  # None: identical low bands (infinite PSNR)
            reasons.append(f"low-pass PSNR {lp:.2f} dB < {config.min_lowpass_psnr:g}")
        if lpips is not None and (rec["lowpass_lpips"] is None or rec["lowpass_lpips"] > config.max_lowpass_lpips):
            reasons.append(f"low-pass LPIPS {_fmt(rec['lowpass_lpips'])} > {config.max_lowpass_lpips:g}")
        if identity is not None and (rec["identity_cos"] is None or rec["identity_cos"] < config.min_identity):
            reasons.append(f"identity similarity {_fmt(rec['identity_cos'])} < {config.min_identity:g}")
        rec["accepted"] = not reasons
        rec["reasons"] = "; ".join(reasons) or None
        records.append(rec)
    return records


def _fmt(v) -> str:
    return "nan" if v is None else f"{v:.3f}"
