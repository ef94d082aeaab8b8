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

from bfr_models import storage
from bfr_models.degradations import load_preset
from bfr_models.idm.model import IDMConfig, IDMError, IDMModel, idm_unet, save_idm
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


def _crops(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, crop: int, hflip: bool, gen: torch.Generator):
    """The same random crop and flip of ``x[idx]`` and ``y[idx]``."""
    H, W = x.shape[-2:]
    tops = torch.randint(0, H - crop + 1, (len(idx),), generator=gen).tolist()
    lefts = torch.randint(0, W - crop + 1, (len(idx),), generator=gen).tolist()
    flips = (torch.rand(len(idx), generator=gen) < 0.5).tolist()
    xs, ys = [], []
    for i, t, l, f in zip(idx.tolist(), tops, lefts, flips):
        a, b = x[i, :, t:t + crop, l:l + crop], y[i, :, t:t + crop, l:l + crop]
        if hflip and f:
            a, b = a.flip(-1), b.flip(-1)
        xs.append(a)
        ys.append(b)
    return torch.stack(xs), torch.stack(ys)


def train_idm(sources: torch.Tensor, model: IDMConfig, config: IDMTrainConfig, out: str, *,
              targets: torch.Tensor | None = None, init: IDMModel | None = None, device: str | torch.device = "cpu",
              source: dict | None = None, on_step: Callable[[int, float], None] | None = None) -> str:
    """Train on ``sources`` (N, 3, H, W) in [0, 1] (targets default to the sources); write the model folder
    to ``out`` and return its URI. Resumes from ``<out>/checkpoints/train_state.safetensors`` when it exists."""
    targets = sources if targets is None else targets
    if sources.dim() != 4 or sources.shape[1] != 3 or sources.shape != targets.shape:
        raise IDMError(f"idm train: sources and targets must be equal (N, 3, H, W) batches, "
                       f"got {tuple(sources.shape)} and {tuple(targets.shape)}")
    if min(sources.shape[-2:]) < model.crop:
        raise IDMError(f"idm train: images of {sources.shape[-1]}x{sources.shape[-2]} are smaller than the crop {model.crop}")
    if init is not None and init.config != model:
        raise IDMError("idm train: the init model's architecture differs from the config")
    device = torch.device(device)
    out = storage.normalize(out)
    preset = load_preset(config.preset)
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
    while step < config.iters:
        idx = torch.randint(0, sources.shape[0], (config.batch_size,), generator=gen)
        src, tgt = _crops(sources, targets, idx, model.crop, config.hflip, gen)
        params = [preset.sample(int(s)) for s in torch.randint(0, 2**62, (config.batch_size,), generator=gen)]
        cond = torch.stack(preset.apply(src.float(), params)).to(device) * 2 - 1
        x0 = tgt.to(device).float() * 2 - 1
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
            on_step(step, loss.item())
        if step % config.checkpoint_every == 0 or step == config.iters:
            info = {**(source or {}), "step": step, "train": asdict(config),
                    "init": init.describe() if init is not None else None}
            save_idm(ema, model, out, source=info)  # the model first, then the resume state
            save_state(state_uri, {"config": [asdict(model), asdict(config)], "step": step, "unet": unet.state_dict(),
                                   "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "generator": gen.get_state()})
    return out
