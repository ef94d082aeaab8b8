"""Samplers over an unconditional ε-prediction prior: plain functions of (inputs, eps_model, schedule).

Conventions shared by every sampler:

- ``eps_model(x_t, t)`` returns ε (C channels) or ε plus guided-diffusion variance values (2C
  channels, learned-range variance). It is always called with **original (T=1000-scale) timesteps**,
  a ``LongTensor`` of shape ``(B,)`` (``schedule.timestep_map`` of the current index), exactly as
  guided-diffusion's ``_WrappedModel`` does for a respaced schedule.
- ``schedule`` is a :class:`~bfr_models.diffusion.schedule.DDPMSchedule`, full or from ``respace``.
- Timestep arguments (``tau``, ``omega``, ``K``, ``L``, ``n2``) are on the **original T-step scale**
  (T = 1000 for the papers' schedule, 0-indexed like guided-diffusion) and are mapped to the nearest
  kept respaced step with ``schedule.index_for``; the ordering checks are done on both scales.
- Images are ``(B, C, H, W)`` in [-1, 1]. ``generators`` is one ``torch.Generator`` per image: every
  random draw for image b comes from ``generators[b]``, on the device that generator lives on
  (:func:`bfr_models.device.generators` puts it on the images' CUDA device), so an image's output does
  not depend on the rest of the batch.
- ``variance_type``: ``None`` (learned range for 2C-channel models, else fixed large), or
  ``"fixed_small"``, ``"fixed_large"``, ``"learned_range"``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from bfr_models.device import randn
from bfr_models.diffusion.lowpass import lowpass
from bfr_models.diffusion.schedule import DDPMSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check(x: torch.Tensor, generators: Sequence[torch.Generator], name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if len(generators) != x.shape[0]:
        raise ValueError(f"{name}: need one generator per image ({x.shape[0]}), got {len(generators)}")


def _randn_like(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Standard normal noise, image b drawn from ``generators[b]``."""
    return randn(x.shape[1:], generators, x.device, x.dtype)


def _index(schedule: DDPMSchedule, t_original: int, name: str, what: str) -> int:
    T = int(schedule.timestep_map[-1]) + 1
    if not 0 <= int(t_original) < T:
        raise ValueError(f"{name}: {what}={t_original} must be in 0..{T - 1} (original timestep scale)")
    return schedule.index_for(t_original)


def _tvec(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)


def _p_step(x, i, eps_model, schedule, generators, variance_type, clip_denoised=True):
    """One ancestral step ``x_i -> x_{i-1}`` (no noise at index 0). Returns (sample, pred_x0)."""
    t = _tvec(i, x)
    out = schedule.p_mean_variance(eps_model(x, schedule.model_timesteps(t)), x, t, variance_type, clip_denoised)
    if i == 0:
        return out["mean"], out["pred_x0"]
    noise = _randn_like(x, generators)
    return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise, out["pred_x0"]


def _q(x0, i, schedule, generators):
    return schedule.q_sample(x0, _tvec(i, x0), _randn_like(x0, generators))


def _replace_low(x, ref, i_prev, schedule, N, generators):
    """Eq. 10 / Algorithm 1: ``x - Φ_N(x) + Φ_N(y_{i_prev})`` with a fresh noising of ``ref``, computed as
    ``x + Φ_N(y_{i_prev} - x)``: Φ_N is linear (two resizes, each a matrix product), so one low-pass instead
    of two (the same value up to float rounding; the low-pass was a third of a sampling step's CPU time)."""
    y_prev = _q(ref, i_prev, schedule, generators)
    if N == 1:
        return y_prev  # Φ_1 = I (DR2 code: the sample is simply replaced)
    return x + lowpass(y_prev - x, N)


@torch.no_grad()
def dr2_sample(
    y: torch.Tensor,
    eps_model: EpsModel,
    schedule: DDPMSchedule,
    N: int,
    tau: int,
    omega: int | None = None,
    generators: Sequence[torch.Generator] = (),
    variance_type: str | None = None,
) -> torch.Tensor:
    """DR2 degradation remover (dr2_diffbfr.md §2.4): the coarse, clean x̂₀ from LQ ``y``.

    ``tau`` and ``omega`` are on the original T-step scale (paper τ, e.g. 220; code τ=22 on 100 steps
    is τ=220 here) and are mapped to the nearest kept step. ``omega`` defaults to ``tau + 0.25 T``
    (capped at T-1). Steps: ``x_ω = q(y, ω)`` (Eq. 9); for each kept step from ω down to τ+1, an
    ancestral step followed by ``x <- Φ_N(y_{t-1}) + x - Φ_N(x)`` with fresh noise (Eq. 10); then
    ``x̂₀ = (x_τ - sqrt(1-ᾱ_τ) ε_θ(x_τ, τ)) / sqrt(ᾱ_τ)`` clamped to [-1, 1] (Eq. 11).
    Raises ``ValueError`` if ``tau >= omega`` (on either scale) or out of range.
    """
    _check(y, generators, "dr2_sample")
    T = int(schedule.timestep_map[-1]) + 1
    if omega is None:
        omega = min(int(tau) + T // 4, T - 1)
    if int(tau) >= int(omega):
        raise ValueError(f"dr2_sample: tau ({tau}) must be < omega ({omega})")
    i_tau = _index(schedule, tau, "dr2_sample", "tau")
    i_omega = _index(schedule, omega, "dr2_sample", "omega")
    if i_tau >= i_omega:
        raise ValueError(f"dr2_sample: tau ({tau}) and omega ({omega}) map to respaced steps {i_tau} >= {i_omega}")
    lowpass(y[:1], N)  # validate N early
    x = _q(y, i_omega, schedule, generators)
    for i in range(i_omega, i_tau, -1):
        x, _ = _p_step(x, i, eps_model, schedule, generators, variance_type)
        x = _replace_low(x, y, i - 1, schedule, N, generators)
    t = _tvec(i_tau, x)
    out = eps_model(x, schedule.model_timesteps(t))
    eps = out[:, : x.shape[1]]
    return schedule.predict_x0(x, t, eps).clamp(-1, 1)


@torch.no_grad()
def lowfreq_sample(
    y0: torch.Tensor,
    y: torch.Tensor | None,
    eps_model: EpsModel,
    schedule: DDPMSchedule,
    N: int,
    K: int = 600,
    L: int = 360,
    generators: Sequence[torch.Generator] = (),
    variance_type: str | None = None,
) -> torch.Tensor:
    """Low-frequency constrained pseudo targets (unsupervised_pseudo_targets.md §1.2, Algorithm 1).

    ``y0`` initialises the chain: ``x̄_K = q(y0, K)``. ``y`` is the low-frequency reference whose
    noised copies ``y_{t-1}`` replace ``Φ_N(x̄_{t-1})``; Algorithm 1 uses the restorer output for both,
    so pass ``y=None`` (or ``y0``) to follow it verbatim. ``K`` and ``L`` (defaults 600, 360) are on
    the original T-step scale, mapped to the nearest kept step (250 steps: 600 -> index 150 = 602 (tie: later),
    360 -> index 90 = 361). Every kept step from K down to 0 is an ancestral step; after the step at
    index t the replacement is applied while t > L (paper), then free steps down to x̄₀. Unlike the
    released code, the first model call is at K itself (the code noises to index 150 and first
    denoises at 149). Returns x̄₀ in [-1, 1]. Raises ``ValueError`` if ``L >= K``.
    """
    _check(y0, generators, "lowfreq_sample")
    ref = y0 if y is None else y
    if ref.shape != y0.shape:
        raise ValueError(f"lowfreq_sample: y {tuple(ref.shape)} and y0 {tuple(y0.shape)} differ in shape")
    if int(L) >= int(K):
        raise ValueError(f"lowfreq_sample: L ({L}) must be < K ({K})")
    i_K = _index(schedule, K, "lowfreq_sample", "K")
    i_L = _index(schedule, L, "lowfreq_sample", "L")
    if i_L >= i_K:
        raise ValueError(f"lowfreq_sample: K ({K}) and L ({L}) map to respaced steps {i_K} <= {i_L}")
    lowpass(y0[:1], N)
    x = _q(y0, i_K, schedule, generators)
    for i in range(i_K, -1, -1):
        x, _ = _p_step(x, i, eps_model, schedule, generators, variance_type)
        if i > i_L:
            x = _replace_low(x, ref, i - 1, schedule, N, generators)
    return x.clamp(-1, 1)


@torch.no_grad()
def polish_sample(
    x: torch.Tensor,
    eps_model: EpsModel,
    schedule: DDPMSchedule,
    n2: int | None = None,
    generators: Sequence[torch.Generator] = (),
    variance_type: str | None = None,
) -> torch.Tensor:
    """DiffBFR TEM truncated polish (dr2_diffbfr.md §3.3-3.4, Algorithm 1): ``y_{N2} = q(x, N2)``,
    then unconditional ancestral steps t = N2 ... 1.

    ``n2`` is Algorithm 1's N2 (default ``0.1 T`` = 100), 1-indexed as in the paper: the chain is noised
    to ᾱ_{N2} (0-indexed timestep ``n2 - 1``) and runs the ``n2`` steps at timesteps ``n2 - 1 ... 0``:
    exactly ``n2`` model calls on the full schedule, the paper's setting. On a respaced ``schedule``
    (an explicit speed option) timestep ``n2 - 1`` is mapped to the nearest kept step ``i`` and the
    ``i + 1`` kept steps down to 0 run. Algorithm 1's σ_t = sqrt(β_t) is ``variance_type="fixed_large"``
    (the default for an ε-only model); a 6-channel TEM defaults to its learned range.
    """
    _check(x, generators, "polish_sample")
    T = int(schedule.timestep_map[-1]) + 1
    if n2 is None:
        n2 = T // 10
    if not 1 <= int(n2) <= T:
        raise ValueError(f"polish_sample: n2 must be in 1..{T}, got {n2}")
    i_n2 = _index(schedule, int(n2) - 1, "polish_sample", "n2 - 1")
    z = _q(x, i_n2, schedule, generators)
    for i in range(i_n2, -1, -1):
        z, _ = _p_step(z, i, eps_model, schedule, generators, variance_type)
    return z.clamp(-1, 1)
