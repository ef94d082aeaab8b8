"""One intrinsic IDM training round (spec §3.4): x0 regression (Eq. 7) on (degrade(source), target) pairs.

Round 1 trains on (d(x), x); later rounds on (d(x), x*) with the degradation still drawn from the
**original** x and the same crop and flip applied to x and x* (spec §3.3). The degradation is a preset
(``idm`` by default: IDM's ranges with GFPGAN's mechanics), drawn fresh for every sample.

Defaults for what the paper leaves open are the spec's §5 suggestions: Adam 1e-4, 10k-step linear
warm-up, EMA 0.9999, grad-norm clip 1.0, batch 32, L1 (p = 1), discrete t ~ U{0..T-1} (the spec allows
this simplification of SR3's continuous γ). The full training state is checkpointed, so a killed run
resumes; the EMA weights are written as a model folder at every checkpoint.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from bfr_models import storage
from bfr_models.degradations import load_preset
from bfr_models.idm.model import IDMConfig, IDMError, IDMModel, idm_unet, save_idm
from bfr_models.training.data import TensorImages, step_loader
from bfr_models.training.state import STATE_FILE, ema_update, resume, save_state


@dataclass(frozen=True)
class IDMTrainConfig:
    iters: int = 100_000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 10_000
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    loss_p: int = 1
    hflip: bool = True
    preset: str = "idm"
    checkpoint_every: int = 5000
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.iters < 1:
            problems.append(f"iters must be >= 1, got {self.iters}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.loss_p not in (1, 2):
            problems.append(f"loss_p must be 1 or 2, got {self.loss_p}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.warmup < 0 or self.lr <= 0:
            problems.append("lr must be > 0 and warmup >= 0")
        if problems:
            raise IDMError("idm train: " + "; ".join(problems))
        load_preset(self.preset).config  # unknown preset: one line, before any work


class Paired(Dataset):
    """(source, target) images of the same size in [0, 1]: the same image twice when there are no targets."""

    def __init__(self, sources: Dataset, targets: Dataset | None = None):
        if targets is not None and len(targets) != len(sources):
            raise IDMError(f"idm train: {len(sources)} sources but {len(targets)} targets")
        self.sources, self.targets = sources, targets

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.sources[i]
        return source, (source if self.targets is None else self.targets[i])


class TrainingView:
    """One training sample from a pair and its seed: the same random crop and flip of source and target,
    then the source degraded with the preset's draw for this image (in the DataLoader worker).
    Returns (condition, x0), both in [-1, 1]."""

    def __init__(self, preset_name: str, crop: int, hflip: bool):
        self.preset, self.crop, self.hflip = load_preset(preset_name), crop, hflip

    def __call__(self, pair: tuple[torch.Tensor, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, target = pair
        H, W = source.shape[-2:]
        if source.shape != target.shape or min(H, W) < self.crop:
            raise IDMError(f"idm train: a pair of {tuple(source.shape)} and {tuple(target.shape)} cannot give "
                           f"{self.crop} px crops (same-size images at least that large are needed)")
        gen = torch.Generator().manual_seed(seed)
        top = int(torch.randint(0, H - self.crop + 1, (1,), generator=gen))
        left = int(torch.randint(0, W - self.crop + 1, (1,), generator=gen))
        flip = self.hflip and bool(torch.rand(1, generator=gen) < 0.5)
        degrade_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        crops = torch.stack([source, target])[..., top:top + self.crop, left:left + self.crop]
        src, tgt = crops.flip(-1) if flip else crops
        cond = self.preset.apply(src[None].float(), [self.preset.sample(degrade_seed)])[0]
        return cond * 2 - 1, tgt.float() * 2 - 1


def train_idm(sources, model: IDMConfig, config: IDMTrainConfig, out: str, *, targets=None,
              init: IDMModel | None = None, device: str | torch.device = "cpu", source: dict | None = None,
              on_step: Callable[[int, torch.Tensor], None] | None = None, workers: int | None = None) -> str:
    """Train on ``sources`` in [0, 1] (targets default to the sources): Datasets of (3, H, W) images read as
    batches need them (:class:`~bfr_models.training.data.UriImages`) or tensors (N, 3, H, W). Writes the
    model folder to ``out`` and returns its URI. Resumes from ``<out>/checkpoints/train_state.safetensors``
    when it exists. ``on_step(step, loss)`` gets the loss as a detached device tensor (reading it syncs);
    ``workers``: DataLoader processes that read, crop and degrade (None: from the cores; 0: this process)."""
    if isinstance(sources, torch.Tensor):
        if sources.dim() != 4 or sources.shape[1] != 3 or (targets is not None and sources.shape != targets.shape):
            raise IDMError(f"idm train: sources and targets must be equal (N, 3, H, W) batches, got "
                           f"{tuple(sources.shape)} and {tuple(targets.shape) if targets is not None else None}")
        if min(sources.shape[-2:]) < model.crop:
            raise IDMError(f"idm train: images of {sources.shape[-1]}x{sources.shape[-2]} are smaller than the crop {model.crop}")
        sources, targets = TensorImages(sources), (TensorImages(targets) if targets is not None else None)
    pairs = Paired(sources, targets)
    if len(pairs) < 1:
        raise IDMError("idm train: no training images")
    if init is not None and init.config != model:
        raise IDMError("idm train: the init model's architecture differs from the config")
    device = torch.device(device)
    out = storage.normalize(out)
    schedule = model.schedule()
    abar = torch.from_numpy(schedule.alphas_cumprod).float().to(device)

    torch.manual_seed(config.seed)
    unet = idm_unet(model).to(device)
    if init is not None:  # round r+1 starts from round r's EMA weights with a fresh optimizer (spec §5)
        unet.load_state_dict(init.unet.state_dict())
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup) if config.warmup else 1.0)
    gen = torch.Generator().manual_seed(config.seed)
    step = 0
    state_uri = storage.join(out, STATE_FILE)
    state = resume(state_uri, [asdict(model), asdict(config)],
                   {"unet": unet, "ema": ema, "optimizer": opt, "scheduler": sched, "generator": gen}, "idm train", IDMError)
    if state is not None:
        step = int(state["step"])

    unet.train()
    view = TrainingView(config.preset, model.crop, config.hflip)
    for cond, x0 in step_loader(pairs, view, config.batch_size, config.seed, step, config.iters, workers, "idm"):
        cond, x0 = cond.to(device), x0.to(device)
        t = torch.randint(0, model.T, (config.batch_size,), generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(torch.cat([x_t, cond], 1), t).sample
        loss = (pred - x0).abs().pow(config.loss_p).mean()  # Eq. 7
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        step += 1
        ema_update(ema, unet, config.ema_decay, step)
        if on_step is not None:
            on_step(step, loss.detach())
        if step % config.checkpoint_every == 0 or step == config.iters:
            info = {**(source or {}), "step": step, "train": asdict(config),
                    "init": init.describe() if init is not None else None}
            save_idm(ema, model, out, source=info)  # the model first, then the resume state
            save_state(state_uri, {"config": [asdict(model), asdict(config)], "step": step, "unet": unet.state_dict(),
                                   "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "generator": gen.get_state()})
    return out
