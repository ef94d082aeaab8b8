"""CodeFormer's code-level fine-tuning on pseudo targets (unsupervised-BFR spec §2.3, Eq. 13).

    L = L_feat + λ_token · L_token,   λ_token = 0.5
    L_feat  = mean((codebook[idx_gt] - E(y))²)          E: the encoder being trained, y the LQ input
    L_token = CrossEntropy(T(E(y)), idx_gt)              T: the Transformer's code logits

``idx_gt`` are the pseudo target's codes: a **frozen copy of the pre-trained encoder** applied to the
target, then the nearest codebook entry. The encoder and the Transformer train; the codebook, the
decoder and the CFT fusion stay frozen. No image-level loss. Adam 1e-4 (0.9, 0.99), batch 8, 40k
iterations, MultiStepLR at 35k and 38k (γ 0.5), EMA 0.995, horizontal flip: the released config. The
EMA weights are the result (validated and saved). Checkpoints and resume as :func:`finetune`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bfr_models import storage
from bfr_models.restorers.codeformer import FIDELITY_WEIGHT, CodeFormerRestorer
from bfr_models.training.data import coin, step_loader
from bfr_models.training.finetune import (STATE_FILE, FinetuneError, LoopKnobs, Pairs, restore_rng, settled,
                                          validate, write_checkpoint)
from bfr_models.training.state import ema_update, resume

TRAINED = ("encoder", "position_emb", "feat_emb", "ft_layers", "idx_pred_layer")  # the rest is frozen


@dataclass(frozen=True)
class CodeFormerFinetuneConfig(LoopKnobs):
    iters: int = 40_000
    batch_size: int = 8
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    milestones: tuple[int, ...] = (35_000, 38_000)
    gamma: float = 0.5
    ema_decay: float = 0.995
    feat_weight: float = 1.0
    token_weight: float = 0.5
    hflip: bool = True
    fidelity_weight: float = FIDELITY_WEIGHT  # w at validation (the paper's inference setting)

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if self.iters < 1:
            raise FinetuneError(f"finetune: iters must be >= 1, got {self.iters}")
        if self.batch_size < 1 or self.lr <= 0 or self.checkpoint_every < 1 or self.validate_every < 1:
            raise FinetuneError("finetune: batch_size, lr, checkpoint_every and validate_every must be positive")

    @property
    def micro_batch(self) -> int:  # for the shared checks (reals are not used: there is no discriminator)
        return self.batch_size


def nearest_codes(features: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (B, HW) of the nearest codebook entry (K, C) to each feature vector of (B, C, H, W)."""
    flat = features.flatten(2).transpose(1, 2)  # B, HW, C
    return torch.cdist(flat, codebook.unsqueeze(0).expand(flat.shape[0], -1, -1)).argmin(-1)


def code_losses(restorer: CodeFormerRestorer, frozen_encoder: torch.nn.Module, lq: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_feat, L_token, token accuracy) for [0, 1] batches."""
    codebook = restorer.net.quantize.embedding.weight
    with torch.no_grad():
        t = target * 2 - 1
        for block in frozen_encoder.blocks:
            t = block(t)
        idx = nearest_codes(t, codebook)
    lq_feat, _ = restorer.encode(lq * 2 - 1)
    logits = restorer.code_logits(lq_feat)
    b, c, h, w = lq_feat.shape
    quant = F.embedding(idx, codebook).view(b, h, w, c).permute(0, 3, 1, 2)
    l_feat = ((quant.detach() - lq_feat) ** 2).mean()
    l_token = F.cross_entropy(logits.permute(0, 2, 1), idx)
    return l_feat, l_token, (logits.argmax(-1) == idx).float().mean()


def finetune_codeformer(restorer: CodeFormerRestorer, train: Dataset, val: Pairs | None,
                        config: CodeFormerFinetuneConfig, out: str, *, lpips_net: torch.nn.Module | None = None,
                        device: str | torch.device = "cpu", save: Callable | None = None,
                        on_step: Callable[[int, dict], None] | None = None, workers: int | None = None) -> pd.DataFrame:
    """Fine-tune ``restorer`` (its EMA weights end up in it) and return the log, one row per step.

    ``train``: (lq, target) pairs in [0, 1] (:class:`Pairs` or :class:`UriPairs`, read by ``workers``
    DataLoader processes; None: from the cores). ``on_step(step, row)``: losses still device scalars."""
    if len(train) < 1:
        raise FinetuneError("finetune: no training pairs")
    device = torch.device(device)
    out = storage.normalize(out)
    torch.manual_seed(config.seed)
    restorer.to(device).train()
    restorer.fidelity_weight = config.fidelity_weight
    frozen_encoder = copy.deepcopy(restorer.net.encoder).eval().requires_grad_(False)
    for name, module in restorer.net.named_children():
        module.requires_grad_(name in TRAINED)
    restorer.net.position_emb.requires_grad_(True)
    params = [p for p in restorer.parameters() if p.requires_grad]
    ema = copy.deepcopy(restorer).requires_grad_(False)
    opt = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.milestones), gamma=config.gamma)
    step, log = 0, []
    state = resume(storage.join(out, STATE_FILE), asdict(config),
                   {"model": restorer, "ema": ema, "frozen_encoder": frozen_encoder, "optimizer": opt,
                    "scheduler": sched}, "finetune", FinetuneError)
    if state is not None:
        restore_rng(state)
        step, log = int(state["step"]), list(state["log"])
    if step == 0 and val is not None and len(val):
        log.append({"step": 0, **validate(ema, val, lpips_net, device, config)})
    for lq, target in step_loader(train, Flipped(config.hflip), config.batch_size, config.seed, step, config.iters, workers, "pairs"):
        l_feat, l_token, acc = code_losses(restorer, frozen_encoder, lq.to(device), target.to(device))
        loss = config.feat_weight * l_feat + config.token_weight * l_token
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        ema_update(ema, restorer, config.ema_decay, step)
        row = {"step": step, "lr": sched.get_last_lr()[0], "loss": loss.detach(),  # read at checkpoints (settled)
               "feat": l_feat.detach(), "token": l_token.detach(), "token_acc": acc.detach()}
        if val is not None and len(val) and (step % config.validate_every == 0 or step == config.iters):
            row.update(validate(ema, val, lpips_net, device, config))
        log.append(row)
        if on_step is not None:
            on_step(step, row)
        if step % config.checkpoint_every == 0 or step == config.iters:
            write_checkpoint(out, save, ema, log, {
                "config": asdict(config), "step": step, "model": restorer.state_dict(), "ema": ema.state_dict(),
                "frozen_encoder": frozen_encoder.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict()})
    restorer.load_state_dict(ema.state_dict())
    return pd.DataFrame(settled(log))


class Flipped:
    """A pair mirrored (input and target alike) on a coin drawn from the sample's seed, when ``enabled``."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, pair, seed: int):
        return tuple(image.flip(-1) for image in pair) if self.enabled and coin(seed) else pair
