"""DDPM noise schedule (guided-diffusion conventions) and timestep respacing.

Timesteps are 0-indexed as in guided-diffusion: index ``t`` in ``0..T-1`` is the paper's ``t+1``,
``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``. A respaced schedule is an ordinary
:class:`DDPMSchedule` over its kept steps; ``timestep_map[k]`` is the original (T=1000) timestep of
respaced index ``k`` and is what the network must be called with.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bfr_models.choices import VARIANCE_TYPES


def _extract(arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``arr[t]`` broadcast to ``x``'s shape, in ``x``'s dtype and device."""
    out = torch.from_numpy(arr).to(device=t.device)[t.long()].to(dtype=x.dtype, device=x.device)
    return out.reshape(-1, *([1] * (x.dim() - 1)))


class DDPMSchedule:
    """A discrete DDPM schedule from its betas (float64), with the quantities the samplers need."""

    def __init__(self, betas: Sequence[float] | np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("DDPMSchedule: betas must be a non-empty 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.size)
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != betas.shape:
            raise ValueError("DDPMSchedule: timestep_map must have one entry per beta")
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log clipped: the posterior variance is 0 at t=0, so use the t=1 value there.
        pv_clip = np.append(self.posterior_variance[1], self.posterior_variance[1:]) if betas.size > 1 else np.maximum(self.posterior_variance, 1e-20)
        self.posterior_log_variance_clipped = np.log(pv_clip)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        # "fixed large" (σ_t² = β_t, DDPM / DiffBFR Algorithm 1), with the t=0 entry as guided-diffusion sets it.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:]) if betas.size > 1 else betas.copy()

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "DDPMSchedule":
        """Linear betas from ``beta_start`` to ``beta_end`` over T steps (DDPM; DR2, DiffBFR TEM, DifFace)."""
        return cls(np.linspace(beta_start, beta_end, int(T), dtype=np.float64))

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return f"DDPMSchedule(num_timesteps={self.num_timesteps}, original_T={int(self.timestep_map[-1]) + 1})"

    # ---- timestep mapping ----------------------------------------------------------------------------
    def index_for(self, t_original: int) -> int:
        """The index of the kept step nearest to original timestep ``t_original``.

        Ties go to the later step (250 steps: 600 -> index 150 = 602, as the pseudo-target code uses).
        """
        dist = np.abs(self.timestep_map - int(t_original))[::-1]
        return int(self.num_timesteps - 1 - np.argmin(dist))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps to call the network with, for schedule indices ``t``."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t.long()]

    # ---- forward process and x0 ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 2: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
        return _extract(self.sqrt_alphas_cumprod, t, x0) * x0 + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """DR2 Eq. 11: ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
        return _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def q_posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        variance_type: str | None = None,
        clip_denoised: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Mean and log-variance of ``p(x_{t-1} | x_t)`` from the network output at schedule index ``t``.

        ``model_output`` is ε (C channels) or ε plus variance values (2C channels, guided-diffusion
        ``learn_sigma``). ``variance_type``: ``None`` picks ``learned_range`` for 2C channels and
        ``fixed_large`` otherwise; ``learned_range`` interpolates the log variance between the clipped
        posterior variance and β_t with ``frac = (v + 1) / 2``. Returns ``mean``, ``variance``,
        ``log_variance``, ``pred_x0`` (clipped to [-1, 1] if ``clip_denoised``) and ``eps``.
        """
        C = x_t.shape[1]
        if model_output.shape[1] == 2 * C:
            eps, var_values = torch.split(model_output, C, dim=1)
        elif model_output.shape[1] == C:
            eps, var_values = model_output, None
        else:
            raise ValueError(f"p_mean_variance: model output has {model_output.shape[1]} channels, expected {C} or {2 * C}")
        if variance_type is None:
            variance_type = "learned_range" if var_values is not None else "fixed_large"
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"p_mean_variance: variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
        if variance_type == "learned_range":
            if var_values is None:
                raise ValueError("p_mean_variance: learned_range needs a model with 2C output channels")
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = _extract(np.log(self.betas), t, x_t)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            var = self.fixed_large_variance if variance_type == "fixed_large" else self.posterior_variance
            log_var = np.log(var) if variance_type == "fixed_large" else self.posterior_log_variance_clipped
            variance = _extract(var, t, x_t).expand_as(x_t)
            log_variance = _extract(log_var, t, x_t).expand_as(x_t)
        pred_x0 = self.predict_x0(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = self.q_posterior_mean(pred_x0, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}


def space_timesteps(num_timesteps: int, n_steps: int) -> list[int]:
    """The kept timesteps of guided-diffusion's ``space_timesteps(T, [n])`` (one section, even stride)."""
    num_timesteps, n_steps = int(num_timesteps), int(n_steps)
    if not 1 <= n_steps <= num_timesteps:
        raise ValueError(f"respace: n_steps must be in 1..{num_timesteps}, got {n_steps}")
    if n_steps == 1:
        return [0]
    frac_stride = (num_timesteps - 1) / (n_steps - 1)
    cur_idx, taken = 0.0, []
    for _ in range(n_steps):  # accumulate exactly as guided-diffusion does (bit-identical kept steps)
        taken.append(round(cur_idx))
        cur_idx += frac_stride
    return taken


def respace(schedule: DDPMSchedule, n_steps: int) -> DDPMSchedule:
    """guided-diffusion's ``SpacedDiffusion``: keep ``n_steps`` evenly strided timesteps.

    New betas are ``1 - abar_k / abar_{k_prev}`` over the kept steps, so the respaced alpha-bar equals
    the original at every kept step; ``timestep_map`` maps the respaced index to the original timestep.
    """
    kept = space_timesteps(schedule.num_timesteps, n_steps)
    abar = schedule.alphas_cumprod[np.asarray(kept)]
    prev = np.append(1.0, abar[:-1])
    return DDPMSchedule(1.0 - abar / prev, timestep_map=schedule.timestep_map[np.asarray(kept)])
