"""The IDM network and its folder format.

The paper gives only "a DDPM U-Net with extra self-attention at 32x32..8x8, 120M parameters, the
degraded image as condition, x0 prediction" (spec §2.2-2.3). Our reading (spec §10 rows 7-9):
a diffusers ``UNet2DModel`` with 6 input channels (x_t concatenated with the condition x_d, both in
[-1, 1]) and 3 output channels (x̂0), conditioned on the discrete timestep. The default is the spec's
118.9M-parameter suggestion: base 128, multipliers (1, 1, 2, 2, 4, 4), two ResNet blocks per level,
attention at 32 and 16 px of a 512-px crop. The network is fully convolutional, so a model trained on
crops samples whole images of any size divisible by 2^(levels-1).

A model folder (local or fsspec)::

    idm.json                                 format, IDMConfig, weights sha256, provenance (round, init, data)
    unet/config.json                         the UNet2DModel config (plain data)
    unet/diffusion_pytorch_model.safetensors EMA weights
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from diffusers import UNet2DModel

from bfr_models import storage
from bfr_models.device import compiled, prepare_unet, unet_call
from bfr_models.diffusion.schedule import DDPMSchedule

FORMAT = "bfr-curate-idm"
VERSION = 1
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class IDMError(ValueError):
    """An IDM model or config that cannot be used. One line."""


@dataclass(frozen=True)
class IDMConfig:
    crop: int = 512                                     # training crop / resolution the attention levels refer to
    channels: tuple[int, ...] = (128, 128, 256, 256, 512, 512)
    layers_per_block: int = 2
    attention: tuple[int, ...] = (32, 16)               # resolutions (at ``crop``) with self-attention
    norm_groups: int = 32
    T: int = 1000
    beta_start: float = 1e-4                            # linear betas (spec §10 row 11)
    beta_end: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "attention", tuple(int(a) for a in self.attention))
        levels = len(self.channels)
        problems = []
        if levels < 2:
            problems.append("channels needs at least two levels")
        if self.crop < 8 or self.crop % (2 ** (levels - 1)):
            problems.append(f"crop {self.crop} must be >= 8 and divisible by 2^{levels - 1}")
        if any(c % self.norm_groups for c in self.channels):
            problems.append(f"channels {self.channels} must be multiples of norm_groups {self.norm_groups}")
        resolutions = {self.crop // 2 ** i for i in range(levels)}
        if not set(self.attention) <= resolutions:
            problems.append(f"attention resolutions {self.attention} must be among the levels' {sorted(resolutions)}")
        if problems:
            raise IDMError("idm model: " + "; ".join(problems))

    @property
    def multiple(self) -> int:
        """Image sides must be divisible by this to be sampled."""
        return 2 ** (len(self.channels) - 1)

    def schedule(self) -> DDPMSchedule:
        return DDPMSchedule.linear(self.T, self.beta_start, self.beta_end)


def idm_unet(config: IDMConfig) -> UNet2DModel:
    """The conditional network: ``unet(cat(x_t, x_d), t).sample`` is x̂0."""
    attn = [config.crop // 2 ** i in config.attention for i in range(len(config.channels))]
    return UNet2DModel(
        sample_size=config.crop, in_channels=6, out_channels=3, block_out_channels=config.channels,
        layers_per_block=config.layers_per_block, norm_num_groups=config.norm_groups,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=min(64, config.channels[-1]),
    )


@dataclass
class IDMModel:
    """A loaded IDM restorer: network, config and identity."""

    unet: UNet2DModel
    config: IDMConfig
    sha256: str
    uri: str
    meta: dict = field(default_factory=dict)

    def x0_model(self, dtype: torch.dtype | None = None, compile: bool = False):
        """``f(x_t, cond, t) -> x̂0`` in float32 (bf16 autocast when asked, on CUDA; ``compile``: torch.compile).
        On the CPU the UNet sees one image at a time (batch-independent bytes, :func:`bfr_models.device.unet_call`)."""
        unet = compiled(self.unet) if compile else self.unet
        return lambda x_t, cond, t: unet_call(unet, dtype, torch.cat([x_t, cond], dim=1), t)

    @property
    def resolution(self) -> int:
        """The size (px, square) it was trained at: its training images were resized to this (``idm train
        --resolution``; the crop size for a folder that does not record it). ``clean`` applies it at this size."""
        return int(self.meta.get("source", {}).get("resolution") or self.config.crop)

    def describe(self) -> dict:
        return {"uri": self.uri, "sha256": self.sha256, "config": asdict(self.config),
                "round": self.meta.get("source", {}).get("round"), "resolution": self.resolution}


def save_idm(unet: torch.nn.Module, config: IDMConfig, out: str, source: dict | None = None) -> str:
    """Write a model folder (each file atomically, metadata last) and return its URI."""
    from safetensors.torch import save

    out = storage.normalize(out)
    weights = save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()})
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    meta = {"format": FORMAT, "version": VERSION, "config": asdict(config), "weights": WEIGHTS,
            "weights_sha256": storage.sha256_hex(weights), "source": source or {}}
    storage.write_bytes_atomic(storage.join(out, WEIGHTS), weights)
    storage.write_bytes_atomic(storage.join(out, "unet", "config.json"), json.dumps(unet_config, indent=2, default=list).encode())
    storage.write_bytes_atomic(storage.join(out, "idm.json"), json.dumps(meta, indent=2).encode())
    return out


def read_idm_meta(uri: str) -> dict:
    where = storage.join(uri, "idm.json")
    try:
        meta = json.loads(storage.read_bytes(where))
    except FileNotFoundError:
        raise IDMError(f"not an IDM model folder (no idm.json): {uri} — train one with `bfr-curate idm train`") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise IDMError(f"{where} is not valid JSON ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise IDMError(f"{where} is not a {FORMAT} v{VERSION} file")
    return meta


def load_idm(uri: str, device: str | torch.device = "cpu") -> IDMModel:
    """Load a model folder; its weights' sha256 is checked against idm.json. Raises IDMError."""
    from bfr_models.weights import safetensors_from_bytes

    uri = storage.normalize(str(uri))
    meta = read_idm_meta(uri)
    config = IDMConfig(**meta["config"])
    try:  # a path from the file: it must stay inside the folder
        weights_uri = storage.confined_join(uri, meta.get("weights", WEIGHTS))
    except ValueError as e:
        raise IDMError(f"{uri}/idm.json: weights: {e}") from None
    try:
        weights = storage.read_bytes(weights_uri)
    except FileNotFoundError:
        raise IDMError(f"IDM weights not found under {uri}") from None
    digest = storage.sha256_hex(weights)
    if digest != meta.get("weights_sha256"):
        raise IDMError(f"IDM weights under {uri} have sha256 {digest}, idm.json says {meta.get('weights_sha256')}")
    try:
        state = safetensors_from_bytes(weights, f"IDM weights under {uri}")
    except ValueError as e:
        raise IDMError(str(e)) from None
    unet = idm_unet(config)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise IDMError(f"{uri}: weights do not match the config (missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(unexpected)[:3]})")
    return IDMModel(unet=prepare_unet(unet, device), config=config, sha256=digest, uri=uri, meta=meta)
