"""DifBFSR zero-shot x4 face super-resolution (difbfsr.md §3-§5, §13 defaults), batched across images.

Per image, a Super-Resolution Module (SRResNet-style, §3.2) and a Contraction Filter Module (two
conv + LeakyReLU, residual, §3.3) start from fresh weights and are fitted with Adam, alternating,
to the low band of the LR input (Eq. 3) while a frozen unconditional prior runs the reverse
diffusion; at every step the low band of the x0 estimate is replaced by the modules' prediction
(Eq. 5) and a DDPM posterior step is taken with the standard coefficient order (Eqs. 8-9 as
corrected in §11 / §4.5).

The modules are per image but run as one batch: every weight is stored stacked, (B, ...), and
applied with grouped convolutions (groups = B; one conv per image on the CPU, see ``_gconv``), so
B images train their own modules in one forward/backward. The loss is the SUM over images of each image's mean loss: each image's
gradient is then exactly its own, and Adam, being elementwise, is B independent Adams.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from bfr_models.device import rand, randn
from bfr_models.resize import matlab_resize
from bfr_models.diffusion.schedule import DDPMSchedule, respace

SUPPORTED_SCALES = (4,)  # the SRM upsamples by bicubic feature interpolation; x4 is the paper's setting


@dataclass(frozen=True)
class DifBFSRConfig:
    scale: int = 4  # §1: x4 face SR
    N: int | None = None  # low-pass factor of ψ_l; None = a 64-px band, H/64 (§13 #8)
    t_start: int = 401  # truncated start, T=1000 scale: respaced index 100 of 250 = 100 steps (§4.6, §13 #3)
    respace: int = 250  # §4.6
    warmup: int = 100  # alternating SRM/CFM updates before the chain starts (§13 #5)
    updates_per_step: int = 1  # one cooperative update per reverse step (§13 #4)
    lr_srm: float = 2e-3  # α, §5
    lr_cfm: float = 5e-3  # β, §5
    srm_channels: int = 64  # §3.2 / §13 #14
    variance_type: str | None = None  # None: learned range for 6-channel priors, else β̃_t (§4.5)

    def as_dict(self) -> dict:
        return asdict(self)

    def band_factor(self, resolution: int) -> int:
        return self.N if self.N is not None else max(1, resolution // 64)

    def validate(self, resolution: int) -> None:
        """One-line ValueErrors for settings that cannot work at the prior's ``resolution``."""
        if self.scale not in SUPPORTED_SCALES:
            raise ValueError(f"DifBFSR: scale {self.scale} has no SR module config (supported: "
                             f"{', '.join(map(str, SUPPORTED_SCALES))})")
        if resolution % self.scale:
            raise ValueError(f"DifBFSR: the prior's resolution {resolution} is not a multiple of scale {self.scale}")
        n = self.band_factor(resolution)
        if n < 1 or resolution % n:
            raise ValueError(f"DifBFSR: N={n} does not divide the prior's resolution {resolution}")
        if not 0 < self.t_start < 1000:
            raise ValueError(f"DifBFSR: t_start={self.t_start} must be in 1..999 (T=1000 scale)")
        if self.warmup < 0 or self.updates_per_step < 1:
            raise ValueError("DifBFSR: warmup must be >= 0 and updates_per_step >= 1")


@dataclass
class DifBFSRResult:
    images: torch.Tensor  # (B, 3, s*h, s*w) in [-1, 1]
    finite: list[bool]
    loss: list[float]  # each image's final Eq. 3 loss
    error: list[str | None] = field(default_factory=list)


# ------------------------------------------------------------------------------ stacked modules


def _uniform(shape, bound: float, generators, device) -> torch.Tensor:
    """PyTorch's default conv init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), one draw per image's generator."""
    return (rand(shape, generators, device) * 2 - 1) * bound


def _conv_params(cin: int, cout: int, generators, device, zero: bool = False) -> list[torch.Tensor]:
    B, bound = len(generators), 1.0 / math.sqrt(cin * 9)
    if zero:  # the CFM's last conv: D starts as the identity (§3.3)
        return [torch.zeros(B, cout, cin, 3, 3, device=device), torch.zeros(B, cout, device=device)]
    return [_uniform((cout, cin, 3, 3), bound, generators, device), _uniform((cout,), bound, generators, device)]


def _gconv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Image k of ``x`` (B, Cin, H, W) convolved with its own weights ``w[k]`` (B, Cout, Cin, 3, 3).

    On the CPU one conv per image, in batch order: the grouped conv's kernel depends on B, and its
    last-ulp differences grow over the Adam updates (measured: 4e-4 alone vs in a batch of 5), so
    an image's bytes would depend on its companions. On accelerators one grouped conv (throughput).
    """
    B, cin, H, W = x.shape
    if x.device.type == "cpu":
        return torch.cat([F.conv2d(x[k : k + 1], w[k], b[k], padding=1) for k in range(B)])
    out = F.conv2d(x.reshape(1, B * cin, H, W), w.reshape(-1, cin, 3, 3), b.reshape(-1), padding=1, groups=B)
    return out.reshape(B, -1, H, W)


def _prelu(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, a.view(-1, 1, 1, 1) * x)


class StackedModules:
    """The SRM and CFM of B images, weights stacked along a leading batch dimension."""

    def __init__(self, generators: Sequence[torch.Generator], channels: int, device):
        c = channels
        self.srm = [*_conv_params(3, c, generators, device), *_conv_params(c, c, generators, device),
                    *_conv_params(c, c, generators, device), *_conv_params(c, c, generators, device),
                    *_conv_params(c, 3, generators, device),
                    torch.full((len(generators), 4), 0.25, device=device)]  # one PReLU slope per layer
        self.cfm = [*_conv_params(3, c, generators, device), *_conv_params(c, 3, generators, device, zero=True)]
        for p in self.srm + self.cfm:
            p.requires_grad_(True)

    def srm_forward(self, y: torch.Tensor, scale: int) -> torch.Tensor:
        """conv1-PReLU, three conv-PReLU with identity skips and a long skip, bicubic x4 features, conv5."""
        w1, b1, w2, b2, w3, b3, w4, b4, w5, b5, a = self.srm
        h1 = _prelu(_gconv(y, w1, b1), a[:, 0])
        h = h1
        for (w, b), k in zip(((w2, b2), (w3, b3), (w4, b4)), (1, 2, 3)):
            h = h + _prelu(_gconv(h, w, b), a[:, k])
        h = h + h1
        h = F.interpolate(h, scale_factor=scale, mode="bicubic", align_corners=False)
        return _gconv(h, w5, b5)

    def cfm_forward(self, z: torch.Tensor) -> torch.Tensor:
        wa, ba, wb, bb = self.cfm
        f = F.leaky_relu(_gconv(F.leaky_relu(_gconv(z, wa, ba), 0.2), wb, bb), 0.2)
        return z + f

    def predict(self, y: torch.Tensor, scale: int) -> torch.Tensor:
        """ŷ = D(S(y)) (§3.3)."""
        return self.cfm_forward(self.srm_forward(y, scale))


# ------------------------------------------------------------------------------ sampler


def _band(z: torch.Tensor, size: int) -> torch.Tensor:
    """Resize to the band grid: MATLAB's antialiased bicubic (§13 #16, ``bicubic_matlab_antialias``)."""
    return matlab_resize(z, (size, size))


def _psi(z: torch.Tensor, size: int) -> torch.Tensor:
    """ψ_l: down to the band grid and back up (fixed MATLAB bicubic; §3.3)."""
    return matlab_resize(_band(z, size), z.shape[-2:])


def difbfsr_sample(y: torch.Tensor, eps_model, schedule: DDPMSchedule, config: DifBFSRConfig,
                   generators: Sequence[torch.Generator]) -> DifBFSRResult:
    """Super-resolve LR faces ``y`` (B, 3, h, w) in [-1, 1] by ``config.scale`` (§4.7).

    ``schedule`` is the prior's full T=1000 schedule (respaced here); ``eps_model(x, t_original)``.
    An image whose loss becomes non-finite is reported (``finite``/``error``) and the others go on.
    """
    if y.dim() != 4 or len(generators) != y.shape[0]:
        raise ValueError("difbfsr_sample: need a (B, 3, h, w) batch and one generator per image")
    B, _, h, w = y.shape
    H = h * config.scale
    config.validate(H)
    band = H // config.band_factor(H)
    sched = respace(schedule, config.respace)
    # §4.6: "start at respaced index 100 (t = 401), exactly 100 denoising steps", counted as DifFace's
    # start_timesteps = 100: the chain is noised to index 99 and steps 99 ... 0 run (100 model calls).
    n_steps = sched.index_for(config.t_start)
    if n_steps < 1:
        raise ValueError(f"DifBFSR: t_start={config.t_start} leaves no step on {config.respace} respaced steps")
    device = y.device
    mods = StackedModules(generators, config.srm_channels, device)
    betas = (0.9, 0.999)
    opt_srm = torch.optim.Adam(mods.srm, lr=config.lr_srm, betas=betas)
    opt_cfm = torch.optim.Adam(mods.cfm, lr=config.lr_cfm, betas=betas)
    target = _band(y, band).detach()
    failed: list[str | None] = [None] * B
    last_loss = torch.zeros(B)

    def per_image_loss() -> torch.Tensor:
        pred = _band(mods.predict(y, config.scale), band)
        return 0.5 * ((pred - target) ** 2).flatten(1).mean(1)  # Eq. 3 on the band grid, mean per image

    def coop_update(step: str) -> None:
        nonlocal last_loss
        for opt in (opt_srm, opt_cfm):  # SRM with the CFM fixed, then the CFM with the SRM fixed (Eq. 4)
            opt.zero_grad(set_to_none=True)
            loss = per_image_loss()
            ok = torch.isfinite(loss)
            for b in torch.nonzero(~ok).flatten().tolist():
                if failed[b] is None:
                    failed[b] = f"DifBFSR: non-finite loss at {step}"
            torch.where(ok, loss, torch.zeros_like(loss)).sum().backward()  # sum: each image its own gradient
            opt.step()
            last_loss = loss.detach().cpu()

    def noise_like(x):
        return randn(x.shape[1:], generators, device, x.dtype)

    for k in range(config.warmup):
        coop_update(f"warm-up iteration {k}")
    with torch.no_grad():
        y_hat = mods.predict(y, config.scale).clamp(-1, 1)
    t = torch.full((B,), n_steps - 1, dtype=torch.long, device=device)
    x = sched.q_sample(y_hat, t, noise_like(y_hat))  # truncated start from the SRM output (§4.6)
    for i in range(n_steps - 1, -1, -1):
        for _ in range(config.updates_per_step):
            coop_update(f"step {i}")
        t = torch.full((B,), i, dtype=torch.long, device=device)
        with torch.no_grad():
            y_hat = mods.predict(y, config.scale)
            out = eps_model(x, sched.model_timesteps(t))
            variance = config.variance_type or ("learned_range" if out.shape[1] == 2 * x.shape[1] else "fixed_small")
            pmv = sched.p_mean_variance(out, x, t, variance, clip_denoised=True)
            x0 = pmv["pred_x0"]  # Eq. 7 (corrected), clipped
            x0_fused = _psi(y_hat, band) + x0 - _psi(x0, band)  # Eq. 5
            mean = sched.q_posterior_mean(x0_fused, x, t)  # Eq. 8, standard coefficient order
            x = mean + torch.exp(0.5 * pmv["log_variance"]) * noise_like(x) if i > 0 else mean
    finite = [failed[b] is None and bool(torch.isfinite(x[b]).all()) for b in range(B)]
    errors = [failed[b] or (None if finite[b] else "DifBFSR: non-finite output") for b in range(B)]
    return DifBFSRResult(images=x.clamp(-1, 1), finite=finite, loss=[float(v) for v in last_loss], error=errors)
