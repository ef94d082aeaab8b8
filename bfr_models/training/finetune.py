"""Fine-tuning a restorer on (LQ, pseudo target) pairs: the unsupervised-BFR image-level objective (spec §2.1-2.2).

    L = 1.0 * L1(R(y), x̄0) + 0.1 * LPIPS_vgg(R(y), x̄0) + 0.1 * L_GAN        (Eq. 6, 8)

- L_GAN is BCE-with-logits with the non-saturating generator term -log D(R(y)) (BasicSR ``vanilla``);
  D is Real-ESRGAN's U-Net discriminator with spectral norm (BasicSR's ``UNetDiscriminatorSN``,
  ``num_feat=64``, skip connections), trained **from scratch on real HQ faces**, never on the pseudo
  targets (Eq. 7 read as standard BCE), one D step per G step, AdamW at the generator's LR, no scheduler.
- AdamW with cosine annealing from ``lr`` to ``lr_min`` over ``iters``; batch 16 made of micro-batches of 4
  with gradient accumulation. Defaults are the released config (lr 2e-5 -> 5e-6, weight decay 0, LPIPS
  summed over each micro-batch while L1 is a mean); every knob lives in ``catalogs/finetune/*.yaml``.
- bf16 autocast on a GPU (``precision: auto``), fp32 on the CPU; optionally channels_last.
- Pairs stream through a DataLoader (:mod:`bfr_models.training.data`): a step's batch (and its real faces)
  is drawn from (seed, step), so nothing holds the data set and a resumed run reads the same batches.
- The whole state (restorer, D, both optimizers, the scheduler, torch's RNGs, the log)
  is checkpointed every ``checkpoint_every`` steps; calling :func:`finetune` again on the same ``out``
  resumes there, and the loss curve continues as if never interrupted.
- Every ``validate_every`` steps (and at steps 0 and ``iters``) the held-out pairs are restored and scored:
  L1, PSNR, SSIM, LPIPS against the pseudo target and, when ground truth exists, against it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch.utils.data import Dataset

from bfr_models import storage
from bfr_models.metrics.fullref import psnr, ssim
from bfr_models.training.data import TensorImages, TrainingDataError, read_image, step_loader
from bfr_models.training.state import STATE_FILE, resume, save_state

LOG_FILE = "log.parquet"
PRECISIONS = ("auto", "fp32", "bf16")
LPIPS_REDUCTIONS = ("sum", "mean")


class FinetuneError(ValueError):
    """A fine-tuning config or data set that cannot be used. One line."""


@dataclass(frozen=True)
class LoopKnobs:
    """What every fine-tuning recipe has besides its losses and optimiser: precision, checkpoints, validation."""

    precision: str = "auto"
    channels_last: bool = False
    checkpoint_every: int = 1000
    validate_every: int = 500
    val_pairs: int = 16
    seed: int = 0


@dataclass(frozen=True)
class FinetuneConfig(LoopKnobs):
    iters: int = 20_000
    batch_size: int = 16
    micro_batch: int = 4
    lr: float = 2e-5
    lr_min: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    l1_weight: float = 1.0
    lpips_weight: float = 0.1
    gan_weight: float = 0.1
    lpips_net: str = "vgg"
    lpips_reduction: str = "sum"
    d_num_feat: int = 64
    d_skip_connection: bool = True
    d_lr: float | None = None  # None: the generator's LR

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        problems = []
        if self.iters < 1:
            problems.append(f"iters must be >= 1, got {self.iters}")
        if self.micro_batch < 1 or self.batch_size < 1 or self.batch_size % self.micro_batch:
            problems.append(f"batch_size {self.batch_size} must be a positive multiple of micro_batch {self.micro_batch}")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            problems.append(f"need 0 <= lr_min <= lr and lr > 0, got lr {self.lr}, lr_min {self.lr_min}")
        if min(self.l1_weight, self.lpips_weight, self.gan_weight) < 0:
            problems.append("loss weights must be >= 0")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.lpips_reduction not in LPIPS_REDUCTIONS:
            problems.append(f"lpips_reduction must be one of {', '.join(LPIPS_REDUCTIONS)}")
        if self.checkpoint_every < 1 or self.validate_every < 1:
            problems.append("checkpoint_every and validate_every must be >= 1")
        if self.val_pairs < 0:
            problems.append(f"val_pairs must be >= 0, got {self.val_pairs}")
        if problems:
            raise FinetuneError("finetune: " + "; ".join(problems))

    @property
    def accumulation(self) -> int:
        return self.batch_size // self.micro_batch


def finetune_configs_dir() -> Path:
    from bfr_models.choices import catalogs_dir

    return catalogs_dir() / "finetune"


def load_finetune_config(name_or_path: str = "unsupervised_bfr", **overrides):
    """A config from ``catalogs/finetune/<name>.yaml`` (or a YAML path), with ``overrides`` on top.

    Its ``recipe`` key picks the kind: ``image`` (:class:`FinetuneConfig`, the default) or ``codeformer``
    (:class:`~bfr_models.training.codeformer.CodeFormerFinetuneConfig`).
    """
    import yaml

    from bfr_models.training.codeformer import CodeFormerFinetuneConfig

    path = Path(name_or_path)
    if not path.exists():
        path = finetune_configs_dir() / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in finetune_configs_dir().glob("*.yaml")))
        raise FinetuneError(f"finetune config not found: {name_or_path} (configs: {known})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise FinetuneError(f"finetune config {path}: not valid YAML: {getattr(e, 'problem', e)}") from None
    data = {k: v for k, v in data.items() if k != "description"}
    recipes = {"image": FinetuneConfig, "codeformer": CodeFormerFinetuneConfig}
    recipe = data.pop("recipe", "image")
    if recipe not in recipes:
        raise FinetuneError(f"finetune config {path}: recipe must be one of {', '.join(recipes)}, got {recipe!r}")
    cls = recipes[recipe]
    known = {f.name for f in fields(cls)}
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - known)
    if unknown:
        raise FinetuneError(f"finetune config {path}: unknown key '{unknown[0]}' for the {recipe} recipe "
                            f"(keys: {', '.join(sorted(known))})")
    return cls(**data)


@dataclass
class Pairs(Dataset):
    """Image pairs in [0, 1] held in memory (validation samples, tests): LQ inputs, their pseudo targets and,
    where known, ground truth. As a Dataset: (lq, target) pairs."""

    lq: torch.Tensor
    target: torch.Tensor
    gt: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.lq.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lq[i], self.target[i]


class UriPairs(Dataset):
    """(LQ, pseudo target) pairs by URI, read when a batch needs them: (3, H, W) in [0, 1] each."""

    def __init__(self, lq: list[str], target: list[str]):
        self.lq, self.target = list(lq), list(target)

    def __len__(self) -> int:
        return len(self.lq)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lq, target = read_image(self.lq[i]), read_image(self.target[i])
        if lq.shape != target.shape:
            raise TrainingDataError(f"finetune: LQ {self.lq[i]} is {lq.shape[-1]}x{lq.shape[-2]}, its target "
                                    f"{target.shape[-1]}x{target.shape[-2]}; fine-tuning needs same-size pairs")
        return lq, target


class WithReals:
    """A training sample from a pair and its seed: the pair and a real face drawn by the seed (None: no reals)."""

    def __init__(self, reals: Dataset | None):
        self.reals = reals

    def __call__(self, pair, seed: int):
        return pair if self.reals is None else (*pair, self.reals[seed % len(self.reals)])


def as_dataset(images) -> Dataset:
    """Images given as a tensor (N, 3, H, W) or already as a Dataset."""
    return TensorImages(images) if isinstance(images, torch.Tensor) else images


def settled(log: list[dict]) -> list[dict]:
    """The log with its device scalars read (once per checkpoint, not once per step: each read waits for the device)."""
    for row in log:
        for key, value in row.items():
            if isinstance(value, torch.Tensor):
                row[key] = float(value)
    return log


def discriminator(config: FinetuneConfig) -> torch.nn.Module:
    """Real-ESRGAN's U-Net discriminator with spectral norm, from BasicSR."""
    from basicsr.archs.discriminator_arch import UNetDiscriminatorSN

    return UNetDiscriminatorSN(3, num_feat=config.d_num_feat, skip_connection=config.d_skip_connection)


def _autocast(device: torch.device, config: FinetuneConfig):
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _lpips_distance(lpips_net, a, b, reduction: str) -> torch.Tensor:
    d = lpips_net(a, b, normalize=True).flatten()  # normalize: [0, 1] inputs
    return d.sum() if reduction == "sum" else d.mean()


@torch.no_grad()
def validate(model, val: Pairs, lpips_net, device: torch.device, config: FinetuneConfig, batch: int = 8) -> dict:
    """Mean L1, PSNR, SSIM (and LPIPS) of R(lq) against the pseudo target and, when present, the ground truth."""
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(val), batch):
        lq = val.lq[i:i + batch].to(device)
        if config.channels_last:
            lq = lq.contiguous(memory_format=torch.channels_last)
        with _autocast(device, config):
            outs.append(model(lq).float().clamp(0, 1).cpu())
    model.train(was_training)
    out = torch.cat(outs)
    scores = {}
    for name, ref in (("", val.target), ("_gt", val.gt)):
        if ref is None:
            continue
        scores[f"val_l1{name}"] = float((out - ref).abs().mean())
        scores[f"val_psnr{name}"] = float(psnr(out, ref).mean())
        scores[f"val_ssim{name}"] = float(ssim(out, ref).mean()) if min(out.shape[-2:]) >= 11 else math.nan
        if lpips_net is not None:
            scores[f"val_lpips{name}"] = float(torch.cat([
                lpips_net(out[i:i + batch].to(device), ref[i:i + batch].to(device), normalize=True).flatten().cpu()
                for i in range(0, len(val), batch)]).mean())
    return scores


def finetune(model: torch.nn.Module, train: Dataset, val: Pairs | None, reals, config: FinetuneConfig,
             out: str, *, lpips_net: torch.nn.Module | None = None, device: str | torch.device = "cpu",
             save: Callable[[torch.nn.Module, str], None] | None = None,
             on_step: Callable[[int, dict], None] | None = None, workers: int | None = None) -> pd.DataFrame:
    """Fine-tune ``model`` (in place) and return the log (one row per step; validation columns where run).

    ``train``: (lq, target) pairs in [0, 1], :class:`Pairs` in memory or :class:`UriPairs` read by
    ``workers`` DataLoader processes as batches need them (None: from the cores; 0: this process).
    ``reals`` (a tensor (N, 3, H, W) or a Dataset of images in [0, 1]) train the discriminator. ``lpips_net``
    is an ``lpips.LPIPS`` module (needed when ``lpips_weight > 0``). ``save(model, uri)`` writes the restorer
    checkpoint (``<out>/restorer.safetensors``) at every checkpoint. ``on_step(step, row)`` gets the step's
    log row, its losses still device scalars (reading one waits for the device).
    """
    if len(train) < 1:
        raise FinetuneError("finetune: no training pairs")
    if isinstance(train, Pairs) and train.lq.shape != train.target.shape:
        raise FinetuneError(f"finetune: LQ and target batches differ in shape: {tuple(train.lq.shape)} vs {tuple(train.target.shape)}")
    reals = as_dataset(reals) if config.gan_weight > 0 else None
    if reals is not None and len(reals) < config.micro_batch:
        raise FinetuneError(f"finetune: {len(reals)} real images are fewer than a micro-batch ({config.micro_batch})")
    if config.lpips_weight > 0 and lpips_net is None:
        raise FinetuneError("finetune: lpips_weight > 0 needs an LPIPS network")
    device = torch.device(device)
    out = storage.normalize(out)
    memory = torch.channels_last if config.channels_last else torch.contiguous_format
    torch.manual_seed(config.seed)
    model.to(device, memory_format=memory).train()
    disc = discriminator(config).to(device, memory_format=memory).train() if config.gan_weight > 0 else None
    opt_g = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, T_max=config.iters, eta_min=config.lr_min)
    opt_d = (torch.optim.AdamW(disc.parameters(), lr=config.d_lr or config.lr, betas=config.betas,
                               weight_decay=config.weight_decay) if disc is not None else None)
    if lpips_net is not None:
        lpips_net.to(device).eval().requires_grad_(False)
    step, log = 0, []
    state_uri = storage.join(out, STATE_FILE)
    state = resume(state_uri, asdict(config), {"model": model, "opt_g": opt_g, "scheduler": sched,
                   "disc": disc, "opt_d": opt_d}, "finetune", FinetuneError)
    if state is not None:
        restore_rng(state)
        step, log = int(state["step"]), list(state["log"])
    bce = torch.nn.BCEWithLogitsLoss()

    def micro_batches(images: torch.Tensor) -> list[torch.Tensor]:
        return [b.to(device).contiguous(memory_format=memory) for b in images.split(config.micro_batch)]

    if step == 0 and val is not None and len(val):
        log.append({"step": 0, **validate(model, val, lpips_net, device, config)})
    batches = step_loader(train, WithReals(reals), config.batch_size, config.seed, step, config.iters, workers, "pairs")
    for batch in batches:
        row = {"step": step + 1, "lr": sched.get_last_lr()[0], "loss": 0.0, "l1": 0.0, "lpips": 0.0, "gan": 0.0}
        fakes = []
        if disc is not None:
            disc.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        for lq, target in zip(micro_batches(batch[0]), micro_batches(batch[1])):
            with _autocast(device, config):
                restored = model(lq).float()
                l1 = (restored - target).abs().mean()
                lp = (_lpips_distance(lpips_net, restored, target, config.lpips_reduction) if config.lpips_weight
                      else restored.new_zeros(()))
                gan = restored.new_zeros(())
                if disc is not None:  # non-saturating: -log D(R(y))
                    logits = disc(restored).float()
                    gan = bce(logits, torch.ones_like(logits))
                loss = config.l1_weight * l1 + config.lpips_weight * lp + config.gan_weight * gan
            (loss / config.accumulation).backward()
            fakes.append(restored.detach())
            for key, v in (("loss", loss), ("l1", l1), ("lpips", lp), ("gan", gan)):
                row[key] += v.detach().double() / config.accumulation  # read at checkpoints (settled)
        opt_g.step()
        sched.step()
        if disc is not None:  # one D step per G step: reals (HQ faces) vs this step's restorations
            disc.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            row["d_loss"] = 0.0
            for fake, real in zip(fakes, micro_batches(batch[2])):
                with _autocast(device, config):
                    d_real, d_fake = disc(real).float(), disc(fake).float()
                    d_loss = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
                (d_loss / config.accumulation).backward()
                row["d_loss"] += d_loss.detach().double() / config.accumulation
            opt_d.step()
        step += 1
        if val is not None and len(val) and (step % config.validate_every == 0 or step == config.iters):
            row.update(validate(model, val, lpips_net, device, config))
        log.append(row)
        if on_step is not None:
            on_step(step, row)
        if step % config.checkpoint_every == 0 or step == config.iters:
            write_checkpoint(out, save, model, log, {
                "config": asdict(config), "step": step, "model": model.state_dict(),
                "disc": disc.state_dict() if disc is not None else None, "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict() if opt_d is not None else None, "scheduler": sched.state_dict()})
    return pd.DataFrame(settled(log))


def write_checkpoint(out: str, save, model, log: list[dict], state: dict) -> None:
    """The restorer and the log first, then the resume state: a crash between them only repeats steps."""
    if save is not None:
        save(model, storage.join(out, "restorer.safetensors"))
    frame = pd.DataFrame(settled(log))
    storage.write_bytes_atomic(storage.join(out, LOG_FILE), frame.to_parquet(index=False))
    storage.write_bytes_atomic(storage.join(out, "log.csv"), frame.to_csv(index=False).encode())
    save_state(storage.join(out, STATE_FILE), {**state, "log": log, "torch_rng": torch.get_rng_state(),
                                               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None})


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
