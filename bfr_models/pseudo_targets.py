"""Pseudo targets from a diffusion prior: the methods' parameters, one batched call, and the checks.

Methods (samplers in :mod:`bfr_models.diffusion.samplers`; timesteps on the T=1000 scale):

- ``dr2``: DR2 on the LQ input y (N, tau, omega = tau + 0.25T), 100 respaced steps as DR2's code.
- ``lowfreq``: the unsupervised-BFR Algorithm 1 on y0 = R(y) (N, K=600, L=360), 250 respaced steps.
- ``polish``: DiffBFR's truncated TEM polish of y0 = R(y) (n2 = 0.1T): Algorithm 1's t = N2 ... 1 on the
  full 1000-step schedule, exactly N2 model calls (``respace`` is an explicit speed option).
- ``difbfsr``: DifBFSR zero-shot x4 super-resolution of y (per-image modules fitted while sampling;
  :mod:`bfr_models.diffusion.difbfsr`), truncated: exactly 100 steps of 250 respaced steps.

Checks recorded per target: ``lf_psnr`` (PSNR of Φ_N(target) against Φ_N(reference), the
low-frequency consistency the methods enforce by construction) and ``noise_sigma`` (Immerkær's
fast noise estimate, 0-255 scale: Gaussian noise leaking through, DR2's small-N failure).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bfr_models.device import generators, split_on_lanes
from bfr_models.diffusion.difbfsr import DifBFSRConfig, difbfsr_sample
from bfr_models.diffusion.lowpass import lowpass
from bfr_models.diffusion.samplers import dr2_sample, lowfreq_sample, polish_sample
from bfr_models.diffusion.schedule import DDPMSchedule, respace

from bfr_models.choices import DEFAULT_RESPACE
from bfr_models.choices import PSEUDO_TARGET_METHODS as METHODS
from bfr_models.choices import PSEUDO_TARGET_RESIZE_MODES as RESIZE_MODES
# The --auto grids (T=1000 scale): DR2's Table A3 range of N and tau; Algorithm 1's N sweep and K.
AUTO_GRID = {
    "dr2": {"N": [4, 8, 16], "tau": [100, 200, 300]},
    "lowfreq": {"N": [8, 16, 32], "K": [600, 900]},
    "polish": {"n2": [50, 100, 150]},
    "difbfsr": {"N": [4, 8, 16]},  # difbfsr.md §13 #8: sweep the band factor and log the choice
}


class PseudoTargetError(ValueError):
    """Parameters that cannot work (checked before any work). One line."""


@dataclass(frozen=True)
class MethodParams:
    """Every knob of a pseudo-target method, with the papers' defaults; unused ones stay None."""

    method: str
    N: int | None = None
    tau: int | None = None
    omega: int | None = None
    K: int | None = None
    L: int | None = None
    n2: int | None = None
    respace: int | None = None
    variance_type: str | None = None  # None: learned range for 6-channel priors, else fixed large
    scale: int | None = None  # difbfsr: the super-resolution factor
    t_start: int | None = None  # difbfsr: truncated start step
    warmup: int | None = None  # difbfsr: module updates before the chain starts

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def upscale(self) -> int:
        """Output size over input size: DifBFSR's scale, 1 for the restoration methods."""
        return self.scale or 1


def method_params(method: str, **given) -> MethodParams:
    """The method's parameters, defaults filled in.

    dr2: N=4, tau=220 (Table A3, CelebA x4 medium), omega = tau + 0.25T (capped at T-1);
    lowfreq: N=16, K=600, L=360 (the paper's SwinIR setting); polish: n2 = 0.1T = 100;
    difbfsr: scale 4, N = a 64-px band, t_start=401, warmup=100 (difbfsr.md §13).
    """
    if method not in METHODS:
        raise PseudoTargetError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    given = {k: v for k, v in given.items() if v is not None}
    allowed = {"dr2": {"N", "tau", "omega"}, "lowfreq": {"N", "K", "L"}, "polish": {"n2"},
               "difbfsr": {"N", "scale", "t_start", "warmup"}}[method]
    extra = sorted(set(given) - allowed - {"respace", "variance_type"})
    if extra:
        raise PseudoTargetError(f"--{extra[0]} does not apply to method {method} (it takes {', '.join(sorted(allowed))})")
    if method == "dr2":
        p = MethodParams("dr2", N=int(given.get("N", 4)), tau=int(given.get("tau", 220)))
        p = replace(p, omega=int(given["omega"]) if "omega" in given else min(p.tau + 250, 999))
    elif method == "lowfreq":
        p = MethodParams("lowfreq", N=int(given.get("N", 16)), K=int(given.get("K", 600)), L=int(given.get("L", 360)))
    elif method == "polish":
        p = MethodParams("polish", n2=int(given.get("n2", 100)))
    else:
        d = DifBFSRConfig()
        p = MethodParams("difbfsr", N=int(given["N"]) if "N" in given else None, scale=int(given.get("scale", d.scale)),
                         t_start=int(given.get("t_start", d.t_start)), warmup=int(given.get("warmup", d.warmup)))
    return replace(p, respace=int(given.get("respace", DEFAULT_RESPACE[method])),
                   variance_type=given.get("variance_type"))


def difbfsr_config(p: MethodParams) -> DifBFSRConfig:
    return DifBFSRConfig(scale=p.scale, N=p.N, t_start=p.t_start, respace=p.respace, warmup=p.warmup,
                         variance_type=p.variance_type)


def with_resolution(p: MethodParams, resolution: int) -> MethodParams:
    """Fill the defaults that depend on the prior's resolution (DifBFSR's band factor) so rows record them."""
    if p.method == "difbfsr" and p.N is None:
        return replace(p, N=difbfsr_config(p).band_factor(resolution))
    return p


def validate(p: MethodParams, resolution: int, T: int = 1000) -> None:
    """Every check that can be made before sampling; raises PseudoTargetError with one line."""
    if p.method == "difbfsr":
        try:
            difbfsr_config(p).validate(resolution)
        except ValueError as e:
            raise PseudoTargetError(str(e)) from None
    if p.N is not None:
        if p.N < 1:
            raise PseudoTargetError(f"N must be >= 1, got {p.N}")
        if resolution % p.N:
            raise PseudoTargetError(f"N={p.N} does not divide the prior's resolution {resolution} (try a power of two)")
    for name in ("tau", "omega", "K", "L"):
        v = getattr(p, name)
        if v is not None and not 0 <= v < T:
            raise PseudoTargetError(f"{name}={v} must be in 0..{T - 1} (timesteps on the T={T} scale)")
    if p.n2 is not None and not 1 <= p.n2 <= T:
        raise PseudoTargetError(f"n2={p.n2} must be in 1..{T} (DiffBFR's N2: the number of steps on the T={T} scale)")
    if p.method == "dr2" and p.tau >= p.omega:
        raise PseudoTargetError(f"tau ({p.tau}) must be smaller than omega ({p.omega})")
    if p.method == "lowfreq" and p.L >= p.K:
        raise PseudoTargetError(f"L ({p.L}) must be smaller than K ({p.K})")
    if not 1 <= p.respace <= T:
        raise PseudoTargetError(f"respace must be in 1..{T}, got {p.respace}")
    sched = respace(DDPMSchedule.linear(T), p.respace)
    pairs = {"dr2": ("tau", "omega"), "lowfreq": ("L", "K")}.get(p.method)
    if pairs:
        lo, hi = (getattr(p, n) for n in pairs)
        if sched.index_for(lo) >= sched.index_for(hi):
            raise PseudoTargetError(f"{pairs[0]}={lo} and {pairs[1]}={hi} fall on the same of {p.respace} respaced steps; "
                                    f"use more steps (--respace) or move them apart")


def sample(p: MethodParams, y: torch.Tensor, y0: torch.Tensor, eps_model, schedule: DDPMSchedule,
           generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One batched call of the method. ``y`` (LQ) and ``y0`` (restorer output) in [-1, 1]; returns [-1, 1]."""
    sched = respace(schedule, p.respace)
    if p.method == "dr2":
        return dr2_sample(y, eps_model, sched, p.N, p.tau, p.omega, generators, p.variance_type)
    if p.method == "lowfreq":
        return lowfreq_sample(y0, None, eps_model, sched, p.N, p.K, p.L, generators, p.variance_type)
    return polish_sample(y0, eps_model, sched, p.n2, generators, p.variance_type)


def reference_of(p: MethodParams, y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    """The image whose low band the target must keep: y for DR2 and DifBFSR, y0 = R(y) for the others."""
    return y if p.method in ("dr2", "difbfsr") else y0


# ------------------------------------------------------------------------------------------ checks


def lowfreq_psnr(target: torch.Tensor, reference: torch.Tensor, N: int) -> torch.Tensor:
    """Per-image PSNR (dB) of Φ_N(target) against Φ_N(reference); images in [0, 1]. Inf if identical."""
    a, b = lowpass(target.float(), N), lowpass(reference.float(), N)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse)


_IMMERKAER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """Immerkær (1996) fast noise std estimate per image, on the 0-255 scale; images in [0, 1].

    sigma = sqrt(pi/2) / (6 (W-2)(H-2)) * sum |I * M| over the gray image (BT.601 luma), M the
    difference of two Laplacians, which cancels locally linear image structure. For an image of
    pure i.i.d. Gaussian noise of std s it returns about s (sum of squared M weights is 36).
    """
    if images.dim() != 4 or images.shape[-1] < 3 or images.shape[-2] < 3:
        raise ValueError(f"noise_sigma expects (B, C, H>=3, W>=3), got {tuple(images.shape)}")
    x = images.double() * 255.0
    if x.shape[1] == 3:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    kernel = _IMMERKAER.to(x).view(1, 1, 3, 3)
    r = F.conv2d(x, kernel).abs().flatten(1)
    H, W = images.shape[-2:]
    return (math.sqrt(math.pi / 2.0) / (6.0 * (W - 2) * (H - 2))) * r.sum(1)


# ------------------------------------------------------------------------------------------ --auto


@dataclass
class Candidate:
    params: dict
    quality: float  # mean no-reference score of the sample (lower is better for NIQE)
    fidelity: float  # mean low-frequency PSNR (dB) against the input
    noise: float = float("nan")
    pass_rate: float = 1.0  # fraction of the sample that passes the quality gate (bfr_models.gate)
    extra: dict = field(default_factory=dict)


def grid(method: str, base: MethodParams, overrides: dict | None = None) -> list[MethodParams]:
    """The candidates of ``--auto``: the method's grid (or ``overrides``) around ``base``; invalid ones dropped."""
    axes = dict(AUTO_GRID[method])
    axes.update(overrides or {})
    names = sorted(axes)
    out = []
    for values in np.array(np.meshgrid(*[axes[n] for n in names], indexing="ij")).reshape(len(names), -1).T:
        change = {n: int(v) for n, v in zip(names, values)}
        cand = replace(base, **change)
        if method == "dr2" and "tau" in change and base.omega is not None:
            cand = replace(cand, omega=min(cand.tau + 250, 999))  # omega follows tau + 0.25T
        out.append(cand)
    return out


def choose(candidates: list[Candidate], fidelity_limit: float, higher_is_better: bool = False,
           min_pass_rate: float = 0.0, tolerance: float = 0.0) -> tuple[int, str]:
    """Index of the chosen candidate and why.

    Eligible: fidelity at least ``fidelity_limit`` dB, a finite score, and a gate pass rate of at least
    ``min_pass_rate``. Among the eligible, those whose score is within ``tolerance`` of the best count as
    equally good and the least noisy of them wins (a NIQE gain of 0.07 does not buy visible noise). With no
    eligible candidate, the highest pass rate (then the highest fidelity) is chosen and the reason says so.
    """
    if not candidates:
        raise ValueError("choose: no candidates")
    eligible = [i for i, c in enumerate(candidates) if c.fidelity >= fidelity_limit and math.isfinite(c.quality)
                and c.pass_rate >= min_pass_rate]
    if eligible:
        sign = -1.0 if higher_is_better else 1.0
        top = min(sign * candidates[i].quality for i in eligible)
        near = [i for i in eligible if sign * candidates[i].quality <= top + tolerance]
        best = min(near, key=lambda i: (_noise_key(candidates[i]), sign * candidates[i].quality))
        gate = f", gate pass rate >= {min_pass_rate:g}" if min_pass_rate > 0 else ""
        return best, (f"best quality (within {tolerance:g}, then least noise) among {len(eligible)} of "
                      f"{len(candidates)} candidates with low-frequency PSNR >= {fidelity_limit} dB{gate}")
    if min_pass_rate > 0:
        best = max(range(len(candidates)), key=lambda i: (candidates[i].pass_rate, candidates[i].fidelity))
        return best, (f"no candidate reached a gate pass rate of {min_pass_rate:g} with low-frequency PSNR >= "
                      f"{fidelity_limit} dB; chose the highest pass rate ({candidates[best].pass_rate:.2f}), "
                      f"then the most faithful")
    best = max(range(len(candidates)), key=lambda i: candidates[i].fidelity)
    return best, f"no candidate reached {fidelity_limit} dB low-frequency PSNR; chose the most faithful"


def _noise_key(c: Candidate) -> float:
    return c.noise if math.isfinite(c.noise) else math.inf


# ------------------------------------------------------------------------------------------ one batch


@dataclass
class Targets:
    """The outcome of :func:`generate` for a batch: images in [0, 1] and one record per image."""

    images: torch.Tensor  # (B, 3, H, W) at the output size
    records: list[dict]  # per image: lf_psnr, noise_sigma (and the input's), seed, chosen sample, resize, finite


def to_resolution(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a batch to ``size`` x ``size`` (identity when already there)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def generate(p: MethodParams, images: torch.Tensor, prior, seeds: Sequence[Sequence[int]], *, restorer=None,
             resize: str = "input", fidelity_limit: float = 0.0, dtype: torch.dtype | None = None,
             quality_fn=None, compile: bool = False) -> Targets:
    """Pseudo targets for a batch of same-size images in [0, 1] (B, 3, H, W).

    ``seeds[b]`` holds one seed per sample for image b (``best_of`` = its length): every sample is
    drawn with its own generator, so an image's targets do not depend on the rest of the batch.
    With several samples, the one kept passes ``fidelity_limit`` (low-frequency PSNR, dB) and has
    the lowest ``quality_fn`` score (NIQE-like, lower is better; default: the noise estimate).
    ``restorer`` computes y0 = R(y) at the input size before resizing to the prior's resolution.
    ``dtype``/``compile``: the UNet's autocast dtype and torch.compile (:mod:`bfr_models.device`).
    """
    B, _, H, W = images.shape
    R = prior.resolution
    up = p.upscale
    size_in = R // up  # DifBFSR takes LR faces of R / scale pixels
    if resize not in RESIZE_MODES:
        raise PseudoTargetError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "refuse" and (H, W) != (size_in, size_in):
        times = f" times scale {up}" if up > 1 else ""
        raise PseudoTargetError(f"image size {H}x{W}{times} differs from the prior's resolution {R} (resize=refuse)")
    if len(seeds) != B or len({len(s) for s in seeds}) != 1:
        raise ValueError("generate: need the same number of seeds for every image")
    device = prior.device
    y0 = restorer(images) if restorer is not None else images
    y_r, y0_r = to_resolution(images, size_in).to(device) * 2 - 1, to_resolution(y0, R).to(device) * 2 - 1
    y_at_prior = y_r if up == 1 else to_resolution(images, R).to(device) * 2 - 1
    reference = reference_of(p, y_at_prior, y0_r)
    eps_model = prior.eps_model(dtype, compile)
    band = p.N or 1
    out_size = (H * up, W * up) if resize == "input" else (R, R)
    samples, fidelity, noise, errors = [], [], [], []
    for k in range(len(seeds[0])):
        gens = generators([s[k] for s in seeds], device)
        if p.method == "difbfsr":
            result = difbfsr_sample(y_r, eps_model, prior.schedule, difbfsr_config(p), gens)
            out, errs = result.images.float(), result.error
        else:
            out = torch.cat(split_on_lanes(
                lambda part: sample(p, y_r[part], y0_r[part], eps_model, prior.schedule, gens[part]), B, device)).float()
            errs = [None] * B
        errors.append(errs)
        out01 = ((out + 1) / 2).clamp(0, 1)
        # both checks at the prior's resolution, where the sampler works (upsampling would hide noise)
        fidelity.append(lowfreq_psnr(out01, (reference + 1) / 2, band).cpu())
        noise.append(noise_sigma(out01).float().cpu())
        if out_size != (R, R):
            out01 = F.interpolate(out01, size=out_size, mode="bicubic", align_corners=False).clamp(0, 1)
        samples.append(out01)  # at the output size: what is written and what best-of-k scores
    fid, nz = torch.stack(fidelity, 1), torch.stack(noise, 1)  # (B, k)
    nz_in = noise_sigma((y_at_prior + 1) / 2).float().cpu()  # the input's, at the same working resolution
    if len(samples) > 1:
        score = torch.stack([quality_fn(s) if quality_fn is not None else noise_sigma(s) for s in samples], 1).float().cpu()
        failed = torch.tensor([[errors[k][b] is not None for k in range(len(samples))] for b in range(B)])
        score = torch.where((fid >= fidelity_limit) & ~failed, score, score + 1e6)  # failing samples only if all fail
        chosen = score.argmin(1)
    else:
        chosen = torch.zeros(B, dtype=torch.long)
    picked = torch.stack([samples[int(c)][b] for b, c in enumerate(chosen)])
    records = []
    for b in range(B):
        c = int(chosen[b])
        records.append({
            "lf_psnr": float(fid[b, c]), "noise_sigma": float(nz[b, c]), "input_noise_sigma": float(nz_in[b]),
            "seed": int(seeds[b][c]),
            "sample": c, "best_of": len(seeds[b]), "finite": bool(torch.isfinite(picked[b]).all()),
            "error": errors[c][b],
            "resize": None if (H, W) == (size_in, size_in) else {"from": [H, W], "prior": R, "out": list(out_size)},
        })
    return Targets(images=picked.cpu(), records=records)
