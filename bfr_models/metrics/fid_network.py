"""FID's network and preprocessing: pytorch-fid's FID-Inception, clean-fid's TorchScript, each convention's resize.

See :mod:`bfr_models.metrics.fid` for the conventions.
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import inception as tv_inception

from bfr_models import storage
from bfr_models.metrics.fid_stats import (DEFAULT_CONVENTION, FEATURE_CODE_VERSION, FEATURE_DIM, INCEPTION_CARDS,
                                          INPUT_SIZE, FIDConvention, FIDError, check_convention)
from bfr_models.weights import load_strict, state_dict_from_bytes

# --------------------------------------------------------------------------------------------
# The network: pytorch-fid's FID-Inception, reimplemented on torchvision's Inception-v3 blocks
# --------------------------------------------------------------------------------------------


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's 3x3 average pool divides by the number of real (unpadded) inputs.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _TFInceptionA(tv_inception.InceptionA):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ]


class _TFInceptionC(tv_inception.InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(bd))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return [self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))]


class _TFInceptionE(tv_inception.InceptionE):
    """InceptionE whose pool branch is TF's average pool, or (the graph's last block) a 3x3 max pool."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return [self.branch1x1(x), b3, bd, self.branch_pool(pooled)]


class FIDInceptionV3(tv_inception.Inception3):
    """The FID Inception of pytorch-fid (TF's 2015-12-05 graph): 1008 classes, no aux head.

    State-dict keys are torchvision's, so ``pt_inception-2015-12-05-6726825d.pth`` loads strictly.
    ``forward`` takes the already-normalised 299x299 input and returns the (B, 2048) pool3 features.
    """

    def __init__(self) -> None:
        super().__init__(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        self.Mixed_5b = _TFInceptionA(192, pool_features=32)
        self.Mixed_5c = _TFInceptionA(256, pool_features=64)
        self.Mixed_5d = _TFInceptionA(288, pool_features=64)
        self.Mixed_6b = _TFInceptionC(768, channels_7x7=128)
        self.Mixed_6c = _TFInceptionC(768, channels_7x7=160)
        self.Mixed_6d = _TFInceptionC(768, channels_7x7=160)
        self.Mixed_6e = _TFInceptionC(768, channels_7x7=192)
        self.Mixed_7b = _TFInceptionE(1280, max_pool=False)
        self.Mixed_7c = _TFInceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return torch.flatten(self.avgpool(x), 1)


# --------------------------------------------------------------------------------------------
# Resizing, exactly as each convention does it
# --------------------------------------------------------------------------------------------


def clean_resize(img: np.ndarray, size: tuple[int, int] = INPUT_SIZE) -> np.ndarray:
    """clean-fid's ``clean`` resize of one (H, W, 3) uint8 image -> (h, w, 3) float32 in [0, 255].

    Per channel: PIL float ('F') image, bicubic resize, clip to [0, 255] (``size`` is PIL's (w, h)).
    """
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {img.shape}")
    w, h = size
    chans = []
    for c in range(3):
        plane = Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32))
        assert plane.mode == "F"
        plane = plane.resize(size, resample=Image.Resampling.BICUBIC)
        chans.append(np.asarray(plane, dtype=np.float32).clip(0, 255).reshape(h, w, 1))
    return np.concatenate(chans, axis=2).astype(np.float32)


def legacy_pytorch_resize(x: torch.Tensor, size: tuple[int, int] = INPUT_SIZE) -> torch.Tensor:
    """pytorch-fid's resize of (B, 3, H, W) floats in [0, 1]: bilinear, align_corners=False."""
    return F.interpolate(x, size=(size[1], size[0]), mode="bilinear", align_corners=False)


def to_uint8_images(images) -> list[np.ndarray]:
    """(B,3,H,W) tensor (uint8, or float in [0,1]), (B,H,W,3) uint8 array, or a list of either per image
    (CHW tensors / HWC arrays) -> list of (H, W, 3) uint8 arrays."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) tensor, got {tuple(images.shape)}")
        x = images.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return [np.ascontiguousarray(t.permute(1, 2, 0).numpy()) for t in x]
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected a (B, H, W, 3) array, got {images.shape}")
        return [_hwc_uint8(a) for a in images]
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            out.extend(to_uint8_images(im.unsqueeze(0)))
        else:
            out.append(_hwc_uint8(np.asarray(im)))
    return out


def _hwc_uint8(a: np.ndarray) -> np.ndarray:
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {a.shape}")
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------
# Feature extractor
# --------------------------------------------------------------------------------------------


def _is_torchscript(data: bytes) -> bool:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _read_weights(weights_path: str | Path) -> bytes:
    try:
        return storage.read_bytes(str(weights_path))
    except FileNotFoundError:
        raise FileNotFoundError(f"FID Inception weights not found: {weights_path}") from None


class InceptionFeatures:
    """2048-d Inception pool3 features of 8-bit images under one FID convention, in batches on ``device``.

    ``weights_path``: a local path or fsspec URL; default: the convention's model card
    (``INCEPTION_CARDS``), resolved through ``bfr_models.models.model_path`` — a missing file raises
    ``ModelMissingError`` here, before any image is touched.
    """

    def __init__(self, convention: FIDConvention = DEFAULT_CONVENTION, weights_path: str | Path | None = None,
                 device: str | torch.device = "cpu", batch_size: int = 32, resize_workers: int = 0):
        self.convention = check_convention(convention)
        if weights_path is None:
            from bfr_models.models import model_path

            weights_path = model_path(INCEPTION_CARDS[self.convention])
        self.weights_path = str(weights_path)
        self.device = torch.device(device)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = int(batch_size)
        self.resize_workers = int(resize_workers)

        data = _read_weights(self.weights_path)
        self.weights_sha256 = hashlib.sha256(data).hexdigest()
        name = self.weights_path.rstrip("/").rsplit("/", 1)[-1]
        if _is_torchscript(data):
            if self.convention != "clean":
                raise FIDError(f"{self.weights_path} is a TorchScript model; the {self.convention!r} convention runs "
                               f"pytorch-fid's network (model {INCEPTION_CARDS[self.convention]})")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; clean-fid's file is TorchScript
                base = torch.jit.load(io.BytesIO(data), map_location=self.device).eval()
            if not hasattr(base, "layers"):
                raise FIDError(f"{self.weights_path}: TorchScript model has no 'layers' (not clean-fid's inception-2015-12-05.pt)")
            self._net = base.layers
            self._keep = base
            kind = "tf-inception-torchscript"
        else:
            state = state_dict_from_bytes(data, f"FID Inception weights {self.weights_path}")
            net = load_strict(FIDInceptionV3(), state,
                              f"{self.weights_path} is not a pytorch-fid FID-Inception state dict", FIDError)
            self._net = net.to(self.device).eval()
            kind = "pytorch-fid-inception"
        del data
        self.network = f"{kind}:{name}:{self.weights_sha256[:12]}"
        self.fingerprint = f"v{FEATURE_CODE_VERSION}:{self.convention}:{kind}:{self.weights_sha256}"

    def describe(self) -> dict:
        return {"fid_convention": self.convention, "fid_network": self.network, "fid_weights_sha256": self.weights_sha256}

    # -- preprocessing ------------------------------------------------------------------------

    def _map(self, fn, items):
        if self.resize_workers > 1 and len(items) > 1:
            with ThreadPoolExecutor(self.resize_workers) as pool:
                return list(pool.map(fn, items))
        return [fn(i) for i in items]

    def preprocess(self, imgs: list[np.ndarray]) -> torch.Tensor:
        """The network input for a batch of (H, W, 3) uint8 images: (B, 3, 299, 299) on ``device``."""
        if self.convention == "clean":
            resized = np.stack(self._map(clean_resize, imgs))  # (B, 299, 299, 3) float32, [0, 255]
            x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
            return (x - 128.0) / 128.0
        # legacy_pytorch
        if all(im.shape == imgs[0].shape for im in imgs):
            x = torch.from_numpy(np.stack(imgs)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
            x = legacy_pytorch_resize(x)
        else:
            x = torch.cat([legacy_pytorch_resize(torch.from_numpy(im).to(self.device).permute(2, 0, 1)[None].float() / 255.0)
                           for im in imgs])
        return 2.0 * x - 1.0

    @torch.inference_mode()
    def __call__(self, images) -> np.ndarray:
        """Features of a batch (see :func:`to_uint8_images` for accepted inputs) -> (B, 2048) float64."""
        imgs = to_uint8_images(images)
        out = []
        for start in range(0, len(imgs), self.batch_size):
            x = self.preprocess(imgs[start:start + self.batch_size])
            f = self._net(x)
            out.append(f.reshape(f.shape[0], -1).float().cpu().numpy().astype(np.float64))
        if not out:
            return np.zeros((0, FEATURE_DIM), dtype=np.float64)
        feats = np.concatenate(out)
        if feats.shape[1] != FEATURE_DIM:
            raise FIDError(f"{self.weights_path}: network gives {feats.shape[1]}-d features, expected {FEATURE_DIM}")
        return feats

