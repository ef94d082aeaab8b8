"""guided-diffusion (ADM / improved-DDPM) UNet checkpoints as diffusers models.

The papers' priors are guided-diffusion checkpoints. :class:`ADMUNet2DModel` is diffusers'
``UNet2DModel`` configured as ADM (scale-shift norm, GroupNorm before every attention, resblock or
conv up/down sampling) plus the one thing UNet2DModel lacks: a number of res blocks per level
(DifFace's FFHQ-512 iDDPM has 1,2,2,2,2,3,4). :func:`convert_adm_state_dict` walks the ADM layout
from its hyperparameters, maps every tensor onto the diffusers module, and checks every shape.
Numerical equivalence with guided-diffusion's own UNet was checked with
``scripts/verify_adm_conversion.py`` (see the README).
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_up_block
from torch import nn

# The published face priors' guided-diffusion hyperparameters (dr2_diffbfr.md 2.4,
# unsupervised_pseudo_targets.md 1.3). attention_ds are downsampling factors (image_size // res).
ADM_ARCHS = {
    "ffhq256": {"image_size": 256, "in_channels": 3, "model_channels": 128, "out_channels": 6,
                "num_res_blocks": 1, "channel_mult": (1, 1, 2, 2, 4, 4), "attention_ds": (16,),
                "num_head_channels": 64, "resblock_updown": True},
    "ffhq512": {"image_size": 512, "in_channels": 3, "model_channels": 32, "out_channels": 6,
                "num_res_blocks": (1, 2, 2, 2, 2, 3, 4), "channel_mult": (1, 2, 4, 8, 8, 16, 16),
                "attention_ds": (16, 32, 64), "num_head_channels": 64, "resblock_updown": False},
}


class ConversionError(ValueError):
    """A checkpoint that does not match the architecture it is converted as. One line."""


class ADMUNet2DModel(UNet2DModel):
    """UNet2DModel with ``layers_per_block`` as an int or one count per level (ADM's num_res_blocks)."""

    @register_to_config
    def __init__(self, sample_size: int = 256, in_channels: int = 3, out_channels: int = 6,
                 block_out_channels: tuple[int, ...] = (128,), layers_per_block: int | tuple[int, ...] = 1,
                 down_block_types: tuple[str, ...] = ("DownBlock2D",), up_block_types: tuple[str, ...] = ("UpBlock2D",),
                 attention_head_dim: int = 64, downsample_type: str = "resnet", upsample_type: str = "resnet",
                 norm_num_groups: int = 32, norm_eps: float = 1e-5):
        levels = len(block_out_channels)
        per_level = [int(layers_per_block)] * levels if isinstance(layers_per_block, int) else [int(n) for n in layers_per_block]
        if len(per_level) != levels:
            raise ValueError(f"layers_per_block has {len(per_level)} entries for {levels} levels")
        super().__init__(
            sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=per_level[0],
            down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
            attention_head_dim=attention_head_dim, downsample_type=downsample_type, upsample_type=upsample_type,
            norm_num_groups=norm_num_groups, norm_eps=norm_eps, attn_norm_num_groups=norm_num_groups,
            resnet_time_scale_shift="scale_shift", flip_sin_to_cos=True, freq_shift=0)
        # UNet2DModel recorded its own (int) layers_per_block; the per-level value is the one that rebuilds this model
        self.register_to_config(layers_per_block=layers_per_block)
        if len(set(per_level)) > 1:
            self._rebuild_blocks(per_level)

    def _rebuild_blocks(self, per_level: list[int]) -> None:
        """Down and up blocks with per-level res block counts (the mid block does not depend on it)."""
        c = self.config
        ch = list(c.block_out_channels)
        temb = ch[0] * 4
        common = dict(temb_channels=temb, resnet_eps=c.norm_eps, resnet_act_fn="silu", resnet_groups=c.norm_num_groups,
                      attention_head_dim=c.attention_head_dim, resnet_time_scale_shift="scale_shift", dropout=0.0)
        self.down_blocks = nn.ModuleList([
            get_down_block(t, num_layers=per_level[i], in_channels=ch[max(i - 1, 0)], out_channels=ch[i],
                           add_downsample=i < len(ch) - 1, downsample_padding=1, downsample_type=c.downsample_type,
                           **common)
            for i, t in enumerate(c.down_block_types)])
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            get_up_block(t, num_layers=per_level[len(ch) - 1 - i] + 1, in_channels=rev[min(i + 1, len(ch) - 1)],
                         out_channels=rev[i], prev_output_channel=rev[max(i - 1, 0)] if i else rev[0],
                         add_upsample=i < len(ch) - 1, resolution_idx=i, upsample_type=c.upsample_type, **common)
            for i, t in enumerate(c.up_block_types)])


def _arch(arch: str | dict) -> dict:
    if isinstance(arch, str):
        if arch not in ADM_ARCHS:
            raise ConversionError(f"unknown ADM architecture {arch!r} (known: {', '.join(ADM_ARCHS)})")
        return dict(ADM_ARCHS[arch])
    return dict(arch)


def _per_level(a: dict) -> list[int]:
    n = a["num_res_blocks"]
    return [int(n)] * len(a["channel_mult"]) if isinstance(n, int) else [int(x) for x in n]


def adm_unet_config(arch: str | dict) -> dict:
    """The ADMUNet2DModel config equivalent to an ADM hyperparameter dict (or a name in ADM_ARCHS)."""
    a = _arch(arch)
    mult = tuple(a["channel_mult"])
    ds = [2 ** i for i in range(len(mult))]
    attn = [d in set(a["attention_ds"]) for d in ds]
    updown = "resnet" if a["resblock_updown"] else "conv"
    plain_down = "ResnetDownsampleBlock2D" if a["resblock_updown"] else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if a["resblock_updown"] else "UpBlock2D"
    per_level = _per_level(a)
    return {
        "sample_size": a["image_size"], "in_channels": a.get("in_channels", 3), "out_channels": a["out_channels"],
        "block_out_channels": tuple(a["model_channels"] * m for m in mult),
        "layers_per_block": per_level[0] if len(set(per_level)) == 1 else tuple(per_level),
        "down_block_types": tuple("AttnDownBlock2D" if x else plain_down for x in attn),
        "up_block_types": tuple("AttnUpBlock2D" if x else plain_up for x in attn[::-1]),
        "attention_head_dim": a["num_head_channels"], "downsample_type": updown, "upsample_type": updown,
    }


def _module_pairs(a: dict) -> list[tuple[str, str, str]]:
    """(ADM prefix, diffusers prefix, kind) for every module of the ADM layout, in ADM's order."""
    per_level, attn_ds = _per_level(a), set(a["attention_ds"])
    last = len(a["channel_mult"]) - 1
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain"),
             ("input_blocks.0.0", "conv_in", "plain")]
    k, ds = 1, 1
    for level in range(last + 1):
        for j in range(per_level[level]):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if ds in attn_ds:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", "attn"))
            k += 1
        if level != last:
            if a["resblock_updown"]:
                pairs.append((f"input_blocks.{k}.0", f"down_blocks.{level}.downsamplers.0", "res"))
            else:
                pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            k, ds = k + 1, ds * 2
    pairs += [("middle_block.0", "mid_block.resnets.0", "res"), ("middle_block.1", "mid_block.attentions.0", "attn"),
              ("middle_block.2", "mid_block.resnets.1", "res")]
    k = 0
    for i, level in enumerate(range(last, -1, -1)):
        for j in range(per_level[level] + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            sub = 1
            if ds in attn_ds:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attn"))
                sub = 2
            if level and j == per_level[level]:
                if a["resblock_updown"]:
                    pairs.append((f"output_blocks.{k}.{sub}", f"up_blocks.{i}.upsamplers.0", "res"))
                else:
                    pairs.append((f"output_blocks.{k}.{sub}.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
                ds //= 2
            k += 1
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


_RES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
        "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _map_tensors(src: str, dst: str, kind: str, state: dict, heads: int) -> dict[str, tuple[str, torch.Tensor]]:
    """The diffusers tensors of one ADM module, each with its ADM key (consumed keys leave ``state``)."""
    out = {}
    for param in ("weight", "bias"):
        if kind == "plain":
            if f"{src}.{param}" in state:
                out[f"{dst}.{param}"] = (f"{src}.{param}", state.pop(f"{src}.{param}"))
        elif kind == "res":
            for a, d in _RES.items():
                if f"{src}.{a}.{param}" in state:
                    out[f"{dst}.{d}.{param}"] = (f"{src}.{a}.{param}", state.pop(f"{src}.{a}.{param}"))
        else:
            if f"{src}.norm.{param}" in state:
                out[f"{dst}.group_norm.{param}"] = (f"{src}.norm.{param}", state.pop(f"{src}.norm.{param}"))
            if f"{src}.proj_out.{param}" in state:
                t = state.pop(f"{src}.proj_out.{param}")
                out[f"{dst}.to_out.0.{param}"] = (f"{src}.proj_out.{param}", t.squeeze(-1) if param == "weight" else t)
            key = f"{src}.qkv.{param}"
            if key in state:
                t = state.pop(key)
                c = t.shape[0] // 3
                if t.shape[0] % (3 * heads):
                    raise ConversionError(f"{key} has shape {tuple(t.shape)}: not 3 x {heads} heads")
                # QKVAttentionLegacy: the 3C output channels are heads x (q, k, v) x head channels
                t = t.reshape(heads, 3, c // heads, *t.shape[1:])
                for n, name in enumerate(("to_q", "to_k", "to_v")):
                    part = t[:, n].reshape(c, *t.shape[3:])
                    out[f"{dst}.{name}.{param}"] = (key, part.squeeze(-1) if param == "weight" else part)
    return out


def _unwrap(state: dict) -> dict:
    for key in ("state_dict", "model", "ema"):
        if isinstance(state.get(key), dict) and all(isinstance(v, torch.Tensor) for v in state[key].values()):
            state = state[key]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def convert_adm_state_dict(state_dict: dict, arch: str | dict) -> ADMUNet2DModel:
    """An ADM state dict -> an equivalent ADMUNet2DModel; every key and shape checked (ConversionError)."""
    a = _arch(arch)
    name = arch if isinstance(arch, str) else "the given ADM configuration"
    unet = ADMUNet2DModel(**adm_unet_config(a))
    expected = unet.state_dict()
    state = dict(_unwrap(state_dict))
    mapped = {}
    for src, dst, kind in _module_pairs(a):
        module = unet.get_submodule(dst) if kind == "attn" else None
        heads = module.heads if module is not None else 1
        mapped.update(_map_tensors(src, dst, kind, state, heads))
    if state:
        extra = sorted(state)
        raise ConversionError(f"checkpoint does not match {name}: {len(extra)} unexpected tensors, first {extra[0]} "
                              f"{tuple(state[extra[0]].shape)}")
    missing = [k for k in expected if k not in mapped]
    if missing:
        raise ConversionError(f"checkpoint does not match {name}: {len(missing)} tensors missing, first the one "
                              f"for {missing[0]} {tuple(expected[missing[0]].shape)}")
    for key, (src, tensor) in mapped.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ConversionError(f"checkpoint does not match {name}: {src} gives {key} the shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    unet.load_state_dict({k: t.float() for k, (_, t) in mapped.items()}, strict=True)
    return unet.eval()
