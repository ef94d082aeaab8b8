"""LPIPS (v0.1, VGG or AlexNet) through the ``lpips`` package, with the backbone from a model card.

``lpips`` ships its calibrated linear layers (``lpips/weights/v0.1/{vgg,alex}.pth``) but fetches the
ImageNet backbone from torchvision's hub at construction. Here the package is built with
``pnet_rand=True`` (nothing is downloaded) and the backbone's convolutions are then loaded from
the torchvision checkpoint named by a model card (``lpips_vgg16_backbone`` = torchvision's
``vgg16-397923af.pth``, ``lpips_alex_backbone`` = ``alexnet-owt-7be5be79.pth``). Every backbone
parameter must come from that file: a random backbone is never used.

lpips cuts ``torchvision.models.<net>().features`` into slices whose children keep their index in
``features``, so ``features.<i>.<p>`` in the checkpoint is ``net.slice<k>.<i>.<p>`` in lpips.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch

from bfr_models.weights import load_state_dict

LPIPSNet = Literal["vgg", "alex"]
BACKBONE_CARDS: dict[str, str] = {"vgg": "lpips_vgg16_backbone", "alex": "lpips_alex_backbone"}
LPIPS_VERSION = "0.1"


class LPIPSWeightsError(ValueError):
    """A backbone file that is not the torchvision checkpoint the card names; one line."""


def backbone_state_for_lpips(model, state: dict, source: str = "backbone file") -> dict:
    """Map a torchvision ``features.*`` state dict onto the lpips trunk (``model.net``) keys, all of them."""
    mapped = {}
    for key, param in model.net.state_dict().items():  # e.g. "slice2.5.weight"
        _slice, idx, pname = key.split(".", 2)
        src = f"features.{idx}.{pname}"
        if src not in state:
            raise LPIPSWeightsError(f"{source} has no '{src}': not a torchvision {model.pnet_type} checkpoint")
        if tuple(state[src].shape) != tuple(param.shape):
            raise LPIPSWeightsError(f"{source}: '{src}' has shape {tuple(state[src].shape)}, lpips expects {tuple(param.shape)}")
        mapped[key] = state[src]
    return mapped


class LPIPS:
    """LPIPS distance of image pairs in [0, 1]: ``lpips(a, b) -> (B,)``, lower is more similar.

    ``backbone_path``: a local path or fsspec URL of the torchvision checkpoint; by default the
    ``BACKBONE_CARDS[net]`` model card's cached file (``ModelMissingError`` here, before any work).
    """

    def __init__(self, net: LPIPSNet = "vgg", device: str | torch.device = "cpu",
                 backbone_path: str | Path | None = None, batch_size: int = 16):
        if net not in BACKBONE_CARDS:
            raise ValueError(f"unknown LPIPS network {net!r}; use one of: {', '.join(BACKBONE_CARDS)}")
        if backbone_path is None:
            from bfr_models.models import model_path

            backbone_path = model_path(BACKBONE_CARDS[net])
        self.net = net
        self.backbone_path = str(backbone_path)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        state = load_state_dict(self.backbone_path, "LPIPS backbone weights")

        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's "pretrained is deprecated"
            # pretrained=True: the package's own linear layers; pnet_rand=True: no backbone download.
            model = lpips.LPIPS(pretrained=True, net=net, version=LPIPS_VERSION, pnet_rand=True, verbose=False)
        model.net.load_state_dict(backbone_state_for_lpips(model, state, self.backbone_path), strict=True)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def describe(self) -> dict:
        return {"lpips_net": self.net, "lpips_version": LPIPS_VERSION, "lpips_backbone": self.backbone_path.rsplit("/", 1)[-1]}

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS of (B, 3, H, W) pairs in [0, 1] (uint8 is divided by 255) -> (B,) float on the CPU."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
        out = []
        for start in range(0, a.shape[0], self.batch_size):
            x = _unit(a[start:start + self.batch_size]).to(self.device)
            y = _unit(b[start:start + self.batch_size]).to(self.device)
            d = self.model(x, y, normalize=True)  # normalize=True: [0, 1] -> [-1, 1] as lpips expects
            out.append(d.reshape(d.shape[0]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
