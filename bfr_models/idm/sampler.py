"""IDM's few-step DDPM sampler (spec §2.6): intrinsic iterative refinement from pure noise.

The paper trains with T = 1000 and samples with 10 DDPM steps from x_T ~ N(0, I); the low-quality
image enters only as the condition. Our reading of the open choices (spec §10 row 12):

- steps: even spacing on the paper's 1-indexed scale, t = T, T - T/S, ..., T/S (1000, 900, ..., 100
  for S = 10), i.e. 0-indexed ``T - 1 - i*T/S``; after the last step comes "step 0" with γ = 1;
- the network predicts x̂0 (Eq. 7), clamped to [-1, 1] and turned into ε̂ for Eq. 8's mean, which is
  then exactly the DDPM posterior mean of q(x_s | x_t, x̂0) for the skipped interval;
- variance ``posterior`` (1-γ_s)/(1-γ_t)·(1-γ_t/γ_s) by default, ``large`` (1-γ_t/γ_s) as Eq. 8 prints it.

One generator per image: an image's result does not depend on the rest of its batch.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from bfr_models.device import randn
from bfr_models.choices import IDM_VARIANCES as VARIANCES
from bfr_models.diffusion.schedule import DDPMSchedule

X0Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def idm_timesteps(T: int, steps: int) -> list[int]:
    """The 0-indexed timesteps of an S-step chain: 999, 899, ..., 99 for T = 1000, S = 10."""
    if not 1 <= steps <= T:
        raise ValueError(f"idm sampler: steps must be in 1..{T}, got {steps}")
    return [T - 1 - (i * T) // steps for i in range(steps)]


@torch.no_grad()
def idm_sample(x0_model: X0Model, cond: torch.Tensor, schedule: DDPMSchedule, generators: Sequence[torch.Generator],
               steps: int = 10, variance: str = "posterior", clip: bool = True) -> torch.Tensor:
    """Restore ``cond`` (B, 3, H, W) in [-1, 1]; returns the sample in [-1, 1] (float32)."""
    if cond.dim() != 4 or cond.shape[1] != 3:
        raise ValueError(f"idm sampler: expected a (B, 3, H, W) condition, got {tuple(cond.shape)}")
    if len(generators) != cond.shape[0]:
        raise ValueError(f"idm sampler: need one generator per image ({cond.shape[0]}), got {len(generators)}")
    if variance not in VARIANCES:
        raise ValueError(f"idm sampler: variance must be one of {VARIANCES}, got {variance!r}")
    cond = cond.float()
    ts = idm_timesteps(schedule.num_timesteps, steps)
    gammas = [float(schedule.alphas_cumprod[t]) for t in ts] + [1.0]
    x = randn(cond.shape[1:], generators, cond.device, cond.dtype)
    for i, t in enumerate(ts):
        g_t, g_s = gammas[i], gammas[i + 1]
        x0 = x0_model(x, cond, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).float()
        if clip:
            x0 = x0.clamp(-1, 1)
        eps = (x - np.sqrt(g_t) * x0) / np.sqrt(1 - g_t)
        a = g_t / g_s
        x = (x - (1 - a) / np.sqrt(1 - g_t) * eps) / np.sqrt(a)
        if i + 1 < len(ts):
            var = (1 - g_s) / (1 - g_t) * (1 - a) if variance == "posterior" else 1 - a
            x = x + float(np.sqrt(var)) * randn(cond.shape[1:], generators, cond.device, cond.dtype)
    return x
