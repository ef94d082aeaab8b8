"""The low-pass filter Φ_N of ILVR / DR2 / unsupervised pseudo targets: down by N, back up by N."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lowpass(x: torch.Tensor, N: int) -> torch.Tensor:
    """Φ_N(x) = Up_N(Down_N(x)) on a batch ``(B, C, H, W)`` (or one image ``(C, H, W)``).

    Down: antialiased bicubic (``antialias=True``, ``align_corners=False``), the MATLAB-imresize
    behaviour ILVR's resizer has; up: bicubic back to ``(H, W)``. ``N = 1`` is the identity.
    Raises ``ValueError`` if N < 1 or N does not divide H and W.
    """
    N = int(N)
    if N < 1:
        raise ValueError(f"lowpass: N must be >= 1, got {N}")
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"lowpass: expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % N or W % N:
        raise ValueError(f"lowpass: N={N} must divide H={H} and W={W}")
    if N == 1:
        out = x
    else:
        small = F.interpolate(x, size=(H // N, W // N), mode="bicubic", antialias=True, align_corners=False)
        out = F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False)
    return out.squeeze(0) if squeeze else out
