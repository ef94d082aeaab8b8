"""Training a small unconditional ε-prediction prior (DDPM's simple loss) on a set of faces.

This is what tests, the demo and users without a published prior use: a UNet2DModel at low
resolution (64 px by default) trained for a few thousand steps. It checkpoints the full training
state (weights, EMA weights, optimizer, step, RNG) so a killed run resumes where it stopped, and
writes the EMA weights as a prior folder (see :mod:`bfr_models.diffusion.prior`) at every checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from bfr_models import storage
from bfr_models.diffusion.prior import save_prior
from bfr_models.diffusion.schedule import DDPMSchedule
from bfr_models.training.data import TensorImages, coin, step_loader
from bfr_models.training.state import STATE_FILE, ema_update, resume, save_state


@dataclass(frozen=True)
class PriorTrainConfig:
    resolution: int = 64
    channels: tuple[int, ...] = (32, 64, 64)  # UNet2DModel block_out_channels, one level per entry
    layers_per_block: int = 1
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    ema_decay: float = 0.999  # EMA weights are what gets saved: much better samples from short training
    checkpoint_every: int = 500
    seed: int = 0
    T: int = 1000
    variance_type: str = "fixed_large"  # DDPM's σ_t² = β_t for an ε-only model

    def __post_init__(self):
        problems = []
        if self.resolution < 8 or self.resolution % (2 ** (len(self.channels) - 1)):
            problems.append(f"resolution {self.resolution} must be >= 8 and divisible by 2^{len(self.channels) - 1}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if any(c % 8 for c in self.channels):
            problems.append(f"channels {self.channels} must be multiples of 8 (GroupNorm with 8 groups)")
        if problems:
            raise ValueError("prior train: " + "; ".join(problems))


def small_unet(config: PriorTrainConfig) -> UNet2DModel:
    """A small UNet2DModel: plain ResNet levels, self-attention at the lowest resolution."""
    n = len(config.channels)
    return UNet2DModel(
        sample_size=config.resolution, in_channels=3, out_channels=3,
        block_out_channels=tuple(config.channels), layers_per_block=config.layers_per_block,
        down_block_types=tuple(["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"]),
        up_block_types=tuple(["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)),
        norm_num_groups=8, attention_head_dim=min(32, config.channels[-1]),
    )


def train_prior(images, config: PriorTrainConfig, out: str, device: str | torch.device = "cpu",
                on_step: Callable[[int, torch.Tensor], None] | None = None, workers: int | None = None,
                source: dict | None = None) -> str:
    """Train on ``images``: a Dataset of (3, R, R) images in [0, 1] read as batches need them
    (:class:`~bfr_models.training.data.UriImages`), or a tensor (N, 3, R, R) in [-1, 1]. Writes the prior
    folder to ``out`` and returns its URI.

    Resumes from ``<out>/checkpoints/train_state.safetensors`` when it exists (same config required).
    ``on_step(step, loss)`` is called after every optimisation step with the loss as a detached 0-dim
    tensor on the device (reading it syncs with the device: progress bars read it every few steps).
    ``workers``: DataLoader processes decoding images (None: from the cores; 0: in this process).
    ``source``: more to record in the prior folder's provenance (e.g. where it was trained).
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (config.resolution,) * 2:
            raise ValueError(f"prior train: images must be (N, 3, {config.resolution}, {config.resolution}), "
                             f"got {tuple(images.shape)}")
        images = TensorImages((images.float() + 1) / 2)
    if len(images) < 1:
        raise ValueError("prior train: no training images")
    device = torch.device(device)
    out = storage.normalize(out)
    schedule = DDPMSchedule.linear(config.T)
    abar = torch.from_numpy(schedule.alphas_cumprod).float().to(device)

    torch.manual_seed(config.seed)
    unet = small_unet(config).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)  # t and noise; the batches come from (seed, step)
    step = 0
    state_uri = storage.join(out, STATE_FILE)
    state = resume(state_uri, asdict(config),
                   {"unet": unet, "ema": ema, "optimizer": opt, "generator": gen}, "prior train")
    if state is not None:
        step = int(state["step"])

    unet.train()
    batches = step_loader(images, _flipped, config.batch_size, config.seed, step, config.steps, workers, "prior")
    for x0 in batches:
        x0 = x0.to(device) * 2 - 1
        t = torch.randint(0, config.T, (config.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        ema_update(ema, unet, config.ema_decay, step)
        if on_step is not None:
            on_step(step, loss.detach())
        if step % config.checkpoint_every == 0 or step == config.steps:
            _checkpoint(unet, ema, opt, gen, step, config, out, source)
    return out


def _flipped(image: torch.Tensor, seed: int) -> torch.Tensor:
    """The training view of one image: mirrored on a coin drawn from its seed."""
    return image.flip(-1) if coin(seed) else image


def _checkpoint(unet, ema, opt, gen, step, config: PriorTrainConfig, out: str, source: dict | None) -> None:
    """Prior folder first, then the resume state: a crash between the two only repeats steps."""
    save_prior(ema, out, variance_type=config.variance_type, T=config.T,
               source={**(source or {}), "trained_by": "bfr-curate prior train", "step": step, "config": asdict(config)})
    save_state(storage.join(out, STATE_FILE), {
        "config": asdict(config), "step": step, "unet": unet.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "generator": gen.get_state(),
    })
