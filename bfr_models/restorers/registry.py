"""``load_restorer(spec)``: the restorer R that computes y0 = R(y) for pseudo targets.

``spec`` is one of
  ``none``     the identity, y0 = y (the paper's fallback when no restorer is given);
  ``bicubic``  also the identity at the input's size: when the LQ is stored at a lower resolution than
               the prior's, the caller (``bfr_models.pseudo_targets.generate``) resizes y0 to the prior's
               size with antialiased bicubic, so ``bicubic`` means "just that resize" -- the classic
               bicubic-upsampling baseline. It differs from ``none`` only in the name recorded;
  a path or fsspec URI of a checkpoint file:
               our own format (:mod:`bfr_models.restorers.checkpoint`) -> :class:`SmallRestorer` or :class:`SwinIRRestorer`;
               anything else is given to spandrel (safetensors, or a pickled state dict read with
               ``torch.load(weights_only=True)``; TorchScript files are not read) -> its image model.

A :class:`Restorer` maps a float batch (B, 3, H, W) in [0, 1] to float32 (B, 3, H, W) in [0, 1] (clamped),
under ``torch.no_grad``, on the model's device; the result goes back to the input's device. Every image is
processed independently (none of the models normalise over the batch), so an image gives the same y0
alone or inside a batch. A spandrel model with scale != 1 (a super-resolution model) gives a larger image,
which is resized back to the input size with antialiased bicubic; ``describe()`` records that. A restorer
whose file records the resolution it was trained at (``finetune`` writes it) runs at that size: images of
another size are resized in and back (MATLAB bicubic, :func:`bfr_models.resize.at_resolution`).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from bfr_models import storage
from bfr_models.weights import torch_load_weights
from bfr_models.resize import at_resolution
from bfr_models.restorers.checkpoint import (arch_of, is_restorer_checkpoint, read_checkpoint, restorer_from_bytes,
                                             safetensors_metadata, trained_resolution)
from bfr_models.restorers.codeformer import ARCH as CODEFORMER
from bfr_models.restorers.codeformer import CodeFormerRestorer
from bfr_models.restorers.errors import RestorerError

BUILTINS = {
    "none": "identity: y0 = y (the paper's fallback)",
    "bicubic": "identity at the input size; the caller's antialiased bicubic resize to the prior's size is the whole restorer",
}
RESIZE_BACK = "bicubic-antialias"


def list_restorers() -> list[str]:
    """The built-in restorer names (any checkpoint path or URI is accepted besides these)."""
    return list(BUILTINS)


@functools.lru_cache(maxsize=1)
def spandrel_registry():
    """spandrel's registry with spandrel-extra-arches added (CodeFormer and the other non-commercial ones)."""
    import spandrel_extra_arches
    from spandrel import MAIN_REGISTRY

    spandrel_extra_arches.install()
    return MAIN_REGISTRY


def spandrel_architectures() -> list[str]:
    """The names of the architectures spandrel can detect and load, in its registry's order."""
    return [a.architecture.name for a in spandrel_registry().architectures()]


def _spandrel_can_load() -> str:
    return f"spandrel can load: {', '.join(spandrel_architectures())}"


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ------------------------------------------------------------------------------------------ restorers


class Restorer:
    """A loaded restorer: ``restorer(batch) -> batch``, plus what a manifest records about it."""

    def __init__(self, name: str, arch: str, *, device: str | torch.device = "cpu", sha256: str | None = None,
                 scale: int = 1, uri: str | None = None, config: dict | None = None, model: torch.nn.Module | None = None,
                 resolution: int | None = None):
        self.name = name
        self.arch = arch
        self.device = torch.device(device)
        self.sha256 = sha256
        self.scale = int(scale)
        self.uri = uri
        self.config = config
        self.model = model
        self.resolution = resolution  # the size (px, square) it was trained at, when its file records it

    @property
    def resize_back(self) -> str | None:
        """How a model's output of another size is brought back to the input size (None: it is not)."""
        return RESIZE_BACK if self.scale != 1 else None

    def describe(self) -> dict:
        """What goes into the manifest params (JSON-ready)."""
        return {"name": self.name, "arch": self.arch, "sha256": self.sha256, "scale": self.scale,
                "uri": self.uri, "resize_back": self.resize_back, "config": self.config,
                "resolution": self.resolution}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, arch={self.arch!r}, scale={self.scale}, device={str(self.device)!r})"

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise RestorerError(f"restorer {self.name}: expected a (B, 3, H, W) batch, got {shape}")
        if not batch.is_floating_point():
            raise RestorerError(f"restorer {self.name}: expected float images in [0, 1], got {batch.dtype}")

        def run(x: torch.Tensor) -> torch.Tensor:
            out = self._forward(x)
            if out.shape[-2:] != x.shape[-2:]:
                out = F.interpolate(out, size=tuple(x.shape[-2:]), mode="bicubic", antialias=True, align_corners=False)
            return out.float().clamp(0, 1)

        with torch.no_grad():  # at the size it was trained at (resized in and back), when its file says
            out = at_resolution(run, batch.to(self.device, torch.float32), self.resolution)
        return out.to(batch.device)


class CheckpointModel(Restorer):
    """A restorer of our checkpoint format behind the Restorer interface. Sizes that are not multiples of
    the network's ``pad_multiple`` are padded (replicate) and cropped back."""

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.model.pad_multiple
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.model(x)[..., :h, :w]


class SpandrelModel(Restorer):
    """An image-to-image model spandrel loaded (``ImageModelDescriptor``); spandrel pads to its size needs."""

    def __init__(self, descriptor, **kwargs):
        super().__init__(model=descriptor.model, **kwargs)
        self.descriptor = descriptor

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # spandrel's call runs under inference_mode; interpolate/clamp in __call__ make a normal tensor again
        return self.descriptor(x)


# ------------------------------------------------------------------------------------------ loading


def _looks_like_name(spec: str) -> bool:
    """A bare word (no folder, no extension, no protocol): meant as a built-in name, not a file."""
    return "://" not in spec and "/" not in spec and os.sep not in spec and "." not in spec


def load_restorer(spec: str, device: str | torch.device = "cpu") -> Restorer:
    """The restorer ``spec`` names (see the module doc), on ``device``, in eval mode. Raises RestorerError."""
    spec = str(spec).strip()
    if spec.lower() in BUILTINS:
        return Restorer(spec.lower(), "identity", device=device)
    if not spec or (_looks_like_name(spec) and not storage.exists(spec)):
        raise RestorerError(f"unknown restorer {spec!r}: built-ins are {', '.join(BUILTINS)}; "
                            f"anything else must be a checkpoint path or URI")
    uri = storage.normalize(spec)
    data = read_checkpoint(uri)
    digest = storage.sha256_hex(data)
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    resolution = trained_resolution(data)
    if is_restorer_checkpoint(data):
        net = restorer_from_bytes(data, uri).to(device).eval()
        return CheckpointModel(name, arch_of(net), device=device, sha256=digest, scale=1, uri=uri,
                               config=net.config, model=net, resolution=resolution)
    descriptor = _spandrel_load(data, uri)
    descriptor = descriptor.to(torch.device(device)).float().eval()
    if descriptor.architecture.name == CODEFORMER:  # [-1, 1] inside, any multiple of 32: our adapter
        net = CodeFormerRestorer(descriptor.model).eval()
        return CheckpointModel(name, CODEFORMER, device=device, sha256=digest, scale=1, uri=uri,
                               config={"loader": "spandrel", **net.config}, model=net, resolution=resolution)
    config = {"loader": "spandrel", "arch_name": descriptor.architecture.name, "purpose": descriptor.purpose,
              "tags": list(descriptor.tags)}
    return SpandrelModel(descriptor, name=name, arch=str(descriptor.architecture.id), device=device, sha256=digest,
                         scale=descriptor.scale, uri=uri, config=config, resolution=resolution)


def _read_state_dict(data: bytes, uri: str) -> dict:
    if safetensors_metadata(data) is not None:
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as e:
            raise RestorerError(f"restorer checkpoint {uri} is a safetensors file that cannot be read "
                                f"({_first_line(e)}); {_spandrel_can_load()}") from None
    try:
        obj = torch_load_weights(data, f"restorer checkpoint {uri}")
    except ValueError as e:
        raise RestorerError(f"{e}; {_spandrel_can_load()}") from None
    if not isinstance(obj, dict):
        raise RestorerError(f"restorer checkpoint {uri} holds a {type(obj).__name__}, not a state dict; "
                            f"{_spandrel_can_load()}")
    return obj


def _spandrel_load(data: bytes, uri: str):
    """The spandrel ImageModelDescriptor of a checkpoint's state dict, checked to be an RGB -> RGB restorer."""
    from spandrel import ImageModelDescriptor, UnsupportedModelError, canonicalize_state_dict

    state = _read_state_dict(data, uri)
    try:
        state = canonicalize_state_dict(state)
        descriptor = spandrel_registry().load(state)
    except UnsupportedModelError:
        keys = ", ".join(list(map(str, state))[:3]) or "no keys"
        raise RestorerError(f"restorer checkpoint {uri}: spandrel recognises no architecture in its state dict "
                            f"({len(state)} entries: {keys}, ...); {_spandrel_can_load()}") from None
    except Exception as e:  # detected, but the tensors do not fit the architecture
        raise RestorerError(f"restorer checkpoint {uri}: spandrel could not load it ({_first_line(e)}); "
                            f"{_spandrel_can_load()}") from None
    arch = descriptor.architecture.name
    if not isinstance(descriptor, ImageModelDescriptor):
        raise RestorerError(f"restorer checkpoint {uri} is a {arch} model for {descriptor.purpose}, "
                            f"not an image-to-image restorer (it needs a mask)")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise RestorerError(f"restorer checkpoint {uri} is a {arch} model with {descriptor.input_channels} input and "
                            f"{descriptor.output_channels} output channels; a restorer maps RGB to RGB (3 -> 3)")
    return descriptor
