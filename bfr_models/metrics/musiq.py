"""MUSIQ (KonIQ-10k weights, score ~0-100, higher is better) on pyiqa's architecture.

pyiqa's ``MUSIQ`` network is built with ``pretrained=False`` (so it never downloads) and its weights
are loaded from the ``musiq_koniq`` model card's file (pyiqa's ``musiq_koniq_ckpt-e95806b9.pth``,
converted from the official TF release) or from a path / fsspec URL given explicitly. The forward
pass is pyiqa's own: inputs in [0, 1] are mapped to [-1, 1] and cut into multi-scale 32x32
patches (longer sides 224 and 384 plus the original resolution), as ``pyiqa.create_metric("musiq")``.

Only ``pyiqa.archs.musiq_arch`` is imported (not ``pyiqa.create_metric``), and its imports need
nothing beyond pyiqa itself and packages the project already has.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bfr_models.device import lane_map
from bfr_models.weights import load_state_dict, load_strict

CARD = "musiq_koniq"
# pyiqa's "musiq" metric options: KonIQ-10k weights regress one MOS value (num_class=1).
MUSIQ_KONIQ_OPTS = {"num_class": 1}


def build_musiq_arch(**opts) -> torch.nn.Module:
    """pyiqa's MUSIQ network with random weights (``pretrained=False``): nothing is downloaded."""
    from pyiqa.archs.musiq_arch import MUSIQ as PyiqaMUSIQ

    return PyiqaMUSIQ(pretrained=False, **{**MUSIQ_KONIQ_OPTS, **opts})


class ChannelsLastMaxPool2d(torch.nn.MaxPool2d):
    """A max-pool run on a channels-last copy of its input: the same maxima, bit for bit (a max is exact).

    torch's CPU max-pool of an NCHW tensor is not vectorised across channels: MUSIQ's root pool over ~260
    patches of 64 channels took 33 ms of a 256-px face's ~370 (one thread), and 12 ms with the copies."""

    @classmethod
    def like(cls, pool: torch.nn.MaxPool2d) -> "ChannelsLastMaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class MUSIQ:
    """MUSIQ-KonIQ scores of (B, 3, H, W) images in [0, 1] -> (B,), in batches on ``device``.

    ``batch_size`` None: one image at a time on the CPU, 8 elsewhere. MUSIQ's attention over ~700 multi-scale
    patches is memory-bound: on a CPU one image at a time is fastest (benchmarks/score.py; 367 against 435 ms
    an image in batches of 8, one thread), and its score does not depend on its batch; on a GPU batches pay off."""

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int | None = None):
        if weights_path is None:
            from bfr_models.models import model_path

            weights_path = model_path(CARD)  # ModelMissingError here, before anything is built
        self.weights_path = str(weights_path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size or (1 if self.device.type == "cpu" else 8))
        state = load_state_dict(self.weights_path, "MUSIQ weights")
        net = load_strict(build_musiq_arch(), state, f"{self.weights_path} is not a MUSIQ-KonIQ state dict")
        if self.device.type == "cpu":
            net.root_pool[-1] = ChannelsLastMaxPool2d.like(net.root_pool[-1])
        self.net = net.to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def describe(self) -> dict:
        return {"musiq_weights": self.weights_path.rsplit("/", 1)[-1]}

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"MUSIQ needs a (B, 3, H, W) batch, got {tuple(images.shape)}")
        starts = range(0, images.shape[0], self.batch_size)
        batches = [images[s:s + self.batch_size] for s in starts]
        if self.device.type == "cpu":  # idle cores beside this shard (the lanes) score other batches at once
            out = lane_map(lambda b: self._score(batches[b]), len(batches))
        else:
            out = [self._score(x) for x in batches]
        return torch.cat(out) if out else torch.zeros(0)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float().clamp(0, 1)
        score = self.net(x.to(self.device))
        return score.reshape(score.shape[0]).float().cpu()
