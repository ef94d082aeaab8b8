"""NRQM (Ma et al. 2017) and PI (PIRM 2018) through pyiqa's own implementations, weights from a model card.

pyiqa would download ``NRQM_model.mat`` on first use; here its path comes from the ``nrqm_pyiqa``
card (``bfr-curate models pull nrqm_pyiqa``). ``nrqm`` is pyiqa's ``nrqm`` metric (Y of YIQ, no
crop); ``pi`` is pyiqa's ``pi``: (10 - NRQM + NIQE) / 2 with both parts on the YCbCr Y channel and a
4-pixel crop, NIQE with the LIVE pristine model the score stage also uses. Higher NRQM is better,
lower PI is better. pyiqa's NRQM random forests run on the CPU, one image at a time.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

NRQM_CARD = "nrqm_pyiqa"


@contextmanager
def _niqe_mat() -> Iterator[str]:
    """pyiqa's NIQE reads a .mat when it is built: one written from the catalog's pristine parameters (no
    download), in a temporary folder removed afterwards."""
    import scipy.io

    from bfr_models.metrics.niqe import pristine_params

    mu, cov = pristine_params()
    with tempfile.TemporaryDirectory(prefix="bfr-curate-niqe-") as folder:
        path = Path(folder) / "niqe_modelparameters.mat"
        scipy.io.savemat(path, {"mu_prisparam": mu[None], "cov_prisparam": cov})
        yield str(path)


class MaMetrics:
    """NRQM and PI of (B, 3, H, W) images in [0, 1]; ``weights_path`` is the NRQM_model.mat file."""

    def __init__(self, weights_path: str | Path):
        from pyiqa.archs.niqe_arch import NIQE
        from pyiqa.archs.nrqm_arch import NRQM

        self._nrqm = NRQM(pretrained_model_path=str(weights_path))
        self._pi_nrqm = NRQM(crop_border=4, color_space="ycbcr", pretrained_model_path=str(weights_path))
        with _niqe_mat() as mat:
            self._pi_niqe = NIQE(crop_border=4, color_space="ycbcr", pretrained_model_path=mat)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, want: tuple[str, ...]) -> dict[str, torch.Tensor]:
        x = images.detach().float().cpu()

        def per_image(metric) -> torch.Tensor:  # pyiqa's NRQM regresses one image at a time
            return torch.stack([metric(x[i : i + 1]).reshape(()) for i in range(len(x))])

        out = {}
        if "nrqm" in want:
            out["nrqm"] = per_image(self._nrqm)
        if "pi" in want:
            out["pi"] = 0.5 * (10.0 - per_image(self._pi_nrqm) + per_image(self._pi_niqe))
        return out
