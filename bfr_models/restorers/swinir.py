"""SwinIR in the unsupervised-BFR paper's configuration (spec §2.2), built on spandrel's SwinIR.

embed_dim 180, 8 stages of 6 blocks with 6 heads, window 8, MLP ratio 2, pixel-unshuffle x8 at the
input and the "nearest+conv" x8 upsampler at the output (a same-resolution 512 -> 512 restorer),
``1conv`` residual connection: 15.79M parameters, as the paper states. Any keyword overrides a value
(tests build narrow ones). Inputs and outputs are in [0, 1].

Saved in our own checkpoint format (arch ``swinir``): spandrel's detector does not recognise
``start_unshuffle`` with the nearest+conv upsampler, so a bare state dict would load as another model.
"""

from __future__ import annotations

from spandrel.architectures.SwinIR import SwinIR

ARCH = "swinir"
PAPER_CONFIG = {
    "img_size": 64, "in_chans": 3, "embed_dim": 180, "depths": [6] * 8, "num_heads": [6] * 8, "window_size": 8,
    "mlp_ratio": 2.0, "upscale": 8, "upsampler": "nearest+conv", "resi_connection": "1conv", "start_unshuffle": 8,
    "img_range": 1.0,
}


class SwinIRRestorer(SwinIR):
    """SwinIR with the paper's configuration by default; ``config`` rebuilds the same architecture."""

    def __init__(self, **overrides):
        config = {**PAPER_CONFIG, **overrides}
        super().__init__(**config)
        self.config = config

    @property
    def pad_multiple(self) -> int:
        """Sides must be multiples of this: the unshuffled feature map is cut into windows."""
        return int(self.config["start_unshuffle"]) * int(self.config["window_size"])
