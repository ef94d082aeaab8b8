"""The metric suite a score run computes: names, conventions, weights needed, batched evaluation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from bfr_models.choices import FULL_REFERENCE, KNOWN_METRICS, SET_LEVEL


@dataclass(frozen=True)
class ScoreConfig:
    metrics: tuple[str, ...]
    niqe_convention: str = "pyiqa"
    crop_border: int = 0
    y_channel: bool = False
    lpips_net: str = "vgg"
    fid_convention: str = "clean"

    def as_dict(self) -> dict:
        return {**asdict(self), "metrics": list(self.metrics)}


def parse_metrics(text: str | list[str]) -> tuple[str, ...]:
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    unknown = [m for m in names if m not in KNOWN_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {', '.join(unknown) or '(none given)'}; choose from {','.join(KNOWN_METRICS)}")
    return tuple(dict.fromkeys(names))


def model_cards_needed(config: ScoreConfig) -> dict[str, str]:
    """metric -> the model card whose weights it needs."""
    from bfr_models.metrics.fid_stats import INCEPTION_CARDS
    from bfr_models.metrics.lpips_metric import BACKBONE_CARDS
    from bfr_models.metrics.ma import NRQM_CARD

    cards = {"musiq": "musiq_koniq", "nrqm": NRQM_CARD, "pi": NRQM_CARD,
             "lpips": BACKBONE_CARDS.get(config.lpips_net, ""),
             "fid": INCEPTION_CARDS.get(config.fid_convention, "")}
    return {m: cards[m] for m in config.metrics if m in cards}


def conventions(config: ScoreConfig) -> dict[str, str]:
    """The exact convention of each metric, written into the score manifest and the report."""
    y = "Y (BT.601) channel" if config.y_channel else "RGB"
    crop = f"{config.crop_border}-pixel border cropped" if config.crop_border else "no border crop"
    text = {
        "niqe": f"NIQE, {config.niqe_convention} convention, LIVE pristine model (BasicSR niqe_pris_params.npz), "
                f"{crop}; lower is better",
        "musiq": "MUSIQ-KonIQ through pyiqa's architecture (musiq_koniq weights); higher is better",
        "nrqm": "NRQM (Ma et al.) through pyiqa, Y of YIQ, no crop (nrqm_pyiqa weights); higher is better",
        "pi": "Perceptual Index (PIRM 2018) through pyiqa: (10 - NRQM + NIQE) / 2 on YCbCr Y, 4-pixel crop; "
              "lower is better",
        "lpips": f"LPIPS v0.1, {config.lpips_net} backbone (ImageNet weights from the model card), "
                 "inputs in [-1, 1]; lower is better",
        "psnr": f"PSNR on 8-bit {y}, {crop}, BasicSR convention; higher is better",
        "ssim": f"SSIM on 8-bit {y}, 11x11 Gaussian window sigma 1.5, {crop}, BasicSR convention; higher is better",
        "fid": f"FID, {config.fid_convention} convention (see bfr_models/metrics/fid.py), 2048-d Inception pool3; "
               "lower is better",
    }
    return {m: text[m] for m in config.metrics}


class MetricSuite:
    """Per-image metrics of a config, built once (weights loaded once) and applied to batches."""

    def __init__(self, config: ScoreConfig, device: torch.device, skip: tuple[str, ...] = ()):
        self.config = config
        self.device = device
        self.metrics = tuple(m for m in config.metrics if m not in skip and m not in SET_LEVEL)
        self._lpips = self._musiq = self._ma = None
        if "lpips" in self.metrics:
            from bfr_models.metrics.lpips_metric import LPIPS

            self._lpips = LPIPS(net=config.lpips_net, device=device)
        if "musiq" in self.metrics:
            from bfr_models.metrics.musiq import MUSIQ

            self._musiq = MUSIQ(device=device)

        if "nrqm" in self.metrics or "pi" in self.metrics:
            from bfr_models.metrics.ma import NRQM_CARD, MaMetrics
            from bfr_models.models import model_path

            self._ma = MaMetrics(model_path(NRQM_CARD))

    @property
    def needs_reference(self) -> bool:
        return any(m in FULL_REFERENCE for m in self.metrics)

    def _groups(self, references: torch.Tensor | None):
        """(metric names, fn(images, references) -> {name: values}) for each metric computed here."""
        c = self.config
        if "niqe" in self.metrics:
            from bfr_models.metrics.niqe import niqe

            yield ("niqe",), lambda x, r: {"niqe": niqe(x, convention=c.niqe_convention, crop_border=c.crop_border)}
        if self._musiq is not None:
            yield ("musiq",), lambda x, r: {"musiq": self._musiq(x)}
        if self._ma is not None:
            names = tuple(m for m in ("nrqm", "pi") if m in self.metrics)
            yield names, lambda x, r: self._ma(x, self.metrics)
        if references is not None:
            from bfr_models.metrics.fullref import psnr, ssim

            if "psnr" in self.metrics:
                yield ("psnr",), lambda x, r: {"psnr": psnr(x, r, crop_border=c.crop_border, y_channel=c.y_channel)}
            if "ssim" in self.metrics:
                yield ("ssim",), lambda x, r: {"ssim": ssim(x, r, crop_border=c.crop_border, y_channel=c.y_channel)}
            if self._lpips is not None:
                yield ("lpips",), lambda x, r: {"lpips": self._lpips(x, r)}

    def __call__(self, images: torch.Tensor, references: torch.Tensor | None
                 ) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
        """Scores of a (B, 3, H, W) batch in [0, 1] (and its references) -> ({metric: (B,) array}, notes).

        A metric that cannot score an image (one too small for NIQE's blocks, ...) is NaN for that image,
        with its reason in ``notes[j][metric]``; the image's other metrics are kept.
        """
        images = images.to(self.device)
        references = references.to(self.device) if references is not None else None
        n = images.shape[0]
        out, notes = {}, [{} for _ in range(n)]
        for names, fn in self._groups(references):
            try:
                out.update(_as_numpy(fn(images, references)))
                continue
            except (ValueError, RuntimeError) as e:
                if n == 1:
                    out.update({m: np.full(1, np.nan) for m in names})
                    notes[0].update({m: str(e) for m in names})
                    continue
            columns = {m: np.full(n, np.nan) for m in names}  # the batch failed: each image alone
            for j in range(n):
                try:
                    one = _as_numpy(fn(images[j : j + 1], references[j : j + 1] if references is not None else None))
                except (ValueError, RuntimeError) as e:
                    notes[j].update({m: str(e) for m in names})
                    continue
                for m in names:
                    columns[m][j] = one[m][0]
            out.update(columns)
        return out, notes


def _as_numpy(scores: dict) -> dict[str, np.ndarray]:
    return {k: torch.as_tensor(v).detach().double().cpu().numpy().reshape(-1) for k, v in scores.items()}
