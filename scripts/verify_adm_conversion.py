"""Check ADM -> diffusers conversion against guided-diffusion's own UNet (not a dependency of the project).

    git clone https://github.com/openai/guided-diffusion /tmp/gd
    python scripts/verify_adm_conversion.py --guided-diffusion /tmp/gd --arch ffhq256 [--write-fixture F]

Builds guided-diffusion's UNetModel with random weights for the architecture, converts its state
dict with bfr_models.diffusion.adm, runs both on the same input and timesteps and prints the
largest output difference and both parameter counts. ``--arch tiny`` / ``tiny_conv`` are small
configurations; ``--write-fixture`` saves {config, state_dict, x, t, out} for the tests.
Per-level res block counts (ffhq512) are DifFace's extension, which guided-diffusion's UNet does
not accept: for ffhq512 only the shapes and parameter count are compared against the converter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bfr_models.diffusion.adm import ADM_ARCHS, convert_adm_state_dict  # noqa: E402

TINY = {
    "tiny": {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 1,
             "channel_mult": (1, 1), "attention_ds": (2,), "num_head_channels": 16, "resblock_updown": True},
    "tiny_conv": {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6, "num_res_blocks": 2,
                  "channel_mult": (1, 1), "attention_ds": (1, 2), "num_head_channels": 16, "resblock_updown": False},
}


def guided_unet(gd_path: str, a: dict):
    sys.path.insert(0, gd_path)
    from guided_diffusion.unet import UNetModel

    if not isinstance(a["num_res_blocks"], int):
        raise SystemExit("guided-diffusion's UNetModel takes one num_res_blocks for all levels")
    return UNetModel(image_size=a["image_size"], in_channels=a["in_channels"], model_channels=a["model_channels"],
                     out_channels=a["out_channels"], num_res_blocks=a["num_res_blocks"],
                     attention_resolutions=tuple(a["attention_ds"]), dropout=0.0, channel_mult=tuple(a["channel_mult"]),
                     num_head_channels=a["num_head_channels"], use_scale_shift_norm=True,
                     resblock_updown=a["resblock_updown"], use_new_attention_order=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guided-diffusion", required=True, help="path of a guided-diffusion checkout")
    ap.add_argument("--arch", default="tiny", choices=[*ADM_ARCHS, *TINY])
    ap.add_argument("--write-fixture", default=None)
    args = ap.parse_args()
    a = dict(TINY.get(args.arch) or ADM_ARCHS[args.arch])
    torch.manual_seed(0)
    theirs = guided_unet(args.guided_diffusion, a).eval()
    # guided-diffusion zero-initialises output convolutions: randomise everything so every tensor matters
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)
    ours = convert_adm_state_dict(theirs.state_dict(), a)
    n = a["image_size"]
    x = torch.randn(2, a["in_channels"], n, n)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        ref, got = theirs(x, t), ours(x, t).sample
    print(f"{args.arch}: guided-diffusion {sum(p.numel() for p in theirs.parameters())} parameters, "
          f"diffusers {sum(p.numel() for p in ours.parameters())}; max |diff| of outputs "
          f"{(ref - got).abs().max().item():.3g} (output std {ref.std().item():.3g})")
    if args.write_fixture:
        torch.save({"config": a, "state_dict": theirs.state_dict(), "x": x, "t": t, "out": ref}, args.write_fixture)


if __name__ == "__main__":
    main()
