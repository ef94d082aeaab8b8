"""Identity similarity of two face images: cosine of FaceNet (InceptionResnetV1, VGGFace2) embeddings.

The weights come from the ``facenet_vggface2`` model card (facenet-pytorch would download them). Faces
are resized to FaceNet's 160x160 input and standardised as facenet-pytorch does ((x*255 - 127.5) / 128).
Used by the clean stage's acceptance test (spec §9.4 A1); the spec suggests ArcFace, for which no
weights are packaged, and the threshold is the clean stage's ``min_identity`` knob.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bfr_models.weights import load_state_dict, load_strict

CARD = "facenet_vggface2"
SIZE = 160


class FaceIdentity:
    """``identity(a, b) -> (B,)`` cosine similarity of (B, 3, H, W) face batches in [0, 1]."""

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        from facenet_pytorch import InceptionResnetV1

        if weights_path is None:
            from bfr_models.models import model_path

            weights_path = model_path(CARD)  # ModelMissingError here, before anything is built
        self.weights_path = str(weights_path)
        self.device = torch.device(device)
        state = {k: v for k, v in load_state_dict(self.weights_path, "FaceNet weights").items()
                 if not k.startswith("logits.")}  # the VGGFace2 classifier head is not used
        net = load_strict(InceptionResnetV1(pretrained=None, classify=False), state,
                          f"{self.weights_path} is not a FaceNet InceptionResnetV1 state dict")
        self.net = net.to(self.device).eval().requires_grad_(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float().to(self.device), size=(SIZE, SIZE), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.net((x * 255.0 - 127.5) / 128.0)

    @torch.inference_mode()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(self.embed(a), self.embed(b), dim=1).float().cpu()
