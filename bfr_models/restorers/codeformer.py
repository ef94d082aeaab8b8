"""CodeFormer (Zhou et al. 2022, via spandrel-extra-arches) behind our [0, 1] restorer interface.

CodeFormer works on [-1, 1] images: encoder -> 16x16 features -> a Transformer predicts codebook indices
-> the fixed codebook's features (AdaIN-matched to the encoder's) -> the fixed decoder, with the
controllable feature transformation (CFT) fusing encoder features at fidelity weight ``w`` (0.5 by
default, the paper's inference setting). Upstream's forward hard-codes a 16x16 token grid (512-px
input); ours takes the grid from the encoder's output, so the same weights also run at other sizes
(tests use small CodeFormers at 128 px). ``encode`` and ``code_logits`` are the pieces the code-level
fine-tuning recipe trains (:mod:`bfr_models.training.codeformer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ARCH = "CodeFormer"
FIDELITY_WEIGHT = 0.5


def _adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Adaptive instance normalisation: ``content`` with ``style``'s per-channel mean and std (as upstream)."""
    c_mean, c_std = content.mean((2, 3), keepdim=True), (content.var((2, 3), keepdim=True) + eps).sqrt()
    s_mean, s_std = style.mean((2, 3), keepdim=True), (style.var((2, 3), keepdim=True) + eps).sqrt()
    return (content - c_mean) / c_std * s_std + s_mean


class CodeFormerRestorer(torch.nn.Module):
    """``restorer(x)`` for x in [0, 1] (B, 3, H, W), H = W a multiple of 32; returns [0, 1]-range images."""

    pad_multiple = 32  # five stride-2 stages in the encoder

    def __init__(self, net: torch.nn.Module, fidelity_weight: float = FIDELITY_WEIGHT):
        super().__init__()
        self.net = net
        self.fidelity_weight = float(fidelity_weight)
        self.config = {"arch": ARCH, "fidelity_weight": self.fidelity_weight}

    def encode(self, x: torch.Tensor, keep: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict]:
        """Encoder features of [-1, 1] images, and the skip features of the CFT connections named in ``keep``
        (named by their size at 512 px, whatever the input's size)."""
        wanted = {self.net.fuse_encoder_block[s]: s for s in keep}
        skips = {}
        for i, block in enumerate(self.net.encoder.blocks):
            x = block(x)
            if i in wanted:
                skips[wanted[i]] = x.clone()
        return x, skips

    def code_logits(self, lq_feat: torch.Tensor) -> torch.Tensor:
        """The Transformer's codebook logits (B, HW, codebook size) for encoder features (B, C, H, W)."""
        pos = self.net.position_emb.unsqueeze(1).repeat(1, lq_feat.shape[0], 1)
        query = self.net.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))
        for layer in self.net.ft_layers:
            query = layer(query, query_pos=pos)
        return self.net.idx_pred_layer(query).permute(1, 0, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        connect = list(self.net.connect_list)
        lq_feat, skips = self.encode(x * 2 - 1, tuple(connect))
        idx = self.code_logits(lq_feat).argmax(-1)
        b, c, h, w = lq_feat.shape
        quant = F.embedding(idx, self.net.quantize.embedding.weight).view(b, h, w, c).permute(0, 3, 1, 2)
        y = _adain(quant.detach(), lq_feat)
        fuse_at = {self.net.fuse_generator_block[s]: s for s in connect}
        for i, block in enumerate(self.net.generator.blocks):
            y = block(y)
            if i in fuse_at and self.fidelity_weight > 0:
                name = fuse_at[i]
                y = self.net.fuse_convs_dict[name](skips[name].detach(), y, self.fidelity_weight)
        return (y + 1) / 2
