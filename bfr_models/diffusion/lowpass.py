"""The low-pass filter Φ_N of ILVR / DR2 / unsupervised pseudo targets: down by N, back up by N, both
with MATLAB's bicubic (:func:`bfr_models.resize.matlab_resize`)."""

from __future__ import annotations

import torch

from bfr_models.resize import matlab_resize


def lowpass(x: torch.Tensor, N: int) -> torch.Tensor:
    """Φ_N(x) = Up_N(Down_N(x)) on a batch ``(B, C, H, W)`` (or one image ``(C, H, W)``).

    Both steps are :func:`matlab_resize` (MATLAB bicubic, a = -0.5, antialiased down, symmetric
    mirroring at the borders), as DR2's and ILVR's Resizer. ``N = 1`` is the identity.
    Raises ``ValueError`` if N < 1 or N does not divide H and W.
    """
    N = int(N)
    if N < 1:
        raise ValueError(f"lowpass: N must be >= 1, got {N}")
    if x.dim() not in (3, 4):
        raise ValueError(f"lowpass: expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if H % N or W % N:
        raise ValueError(f"lowpass: N={N} must divide H={H} and W={W}")
    if N == 1:
        return x
    return matlab_resize(matlab_resize(x, (H // N, W // N)), (H, W))
