"""The project's built-in small face restorer: a compact residual CNN at the input's resolution.

Layout (``channels=C``, ``blocks=N``)::

    x (B,3,H,W) --pixel_unshuffle(2)--> (B,12,H/2,W/2) --conv_in--> C
        --N x [conv-LReLU-conv + skip]--> conv_body (+ long skip from conv_in)
        --conv_out--> 12 --pixel_shuffle(2)--> r (B,3,H,W)
    out = x + r

The body runs at half resolution (pixel-unshuffle keeps every pixel, unlike a strided conv), so the
defaults (C=32, N=4, ~90k parameters) train for a few hundred steps on 64-px crops in seconds on a CPU.
No normalisation layers: an image's output does not depend on the rest of its batch.

``forward`` returns ``x + r`` unclamped (a clamp inside the training loss would zero the gradients at
the range's edges); :class:`bfr_models.restorers.Restorer` clamps to [0, 1] at inference.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCH = "small"
FACTOR = 2  # pixel-unshuffle factor: H and W must be divisible by it


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), 0.2))


class SmallRestorer(nn.Module):
    """Same-resolution restorer: (B, 3, H, W) in [0, 1] -> (B, 3, H, W), H and W even."""

    def __init__(self, channels: int = 32, blocks: int = 4):
        super().__init__()
        for key, value in (("channels", channels), ("blocks", blocks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SmallRestorer: {key} must be a positive integer, got {value!r}")
        self.channels = channels
        self.blocks = blocks
        packed = 3 * FACTOR * FACTOR
        self.conv_in = nn.Conv2d(packed, channels, 3, padding=1)
        self.body = nn.Sequential(*(_ResBlock(channels) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, packed, 3, padding=1)
        # Zero-init the last conv: the residual is exactly 0, so an untrained SmallRestorer is the
        # identity (y0 = y, the paper's fallback). Fine-tuning then starts from "no change" and only
        # learns corrections, instead of first having to learn to reproduce its input.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    pad_multiple = FACTOR  # sides must be multiples of this

    @property
    def config(self) -> dict:
        """Constructor kwargs: ``SmallRestorer(**model.config)`` builds the same architecture."""
        return {"channels": self.channels, "blocks": self.blocks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SmallRestorer: expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % FACTOR or w % FACTOR:
            raise ValueError(f"SmallRestorer: height and width must be divisible by {FACTOR}, got {h}x{w}")
        f = self.conv_in(F.pixel_unshuffle(x, FACTOR))
        f = f + self.conv_body(self.body(f))
        return x + F.pixel_shuffle(self.conv_out(f), FACTOR)
