"""FID: Inception features and the Frechet distance, under an explicit, recorded convention.

Two conventions, never mixed (see ``shared/specs/peers_and_ecosystem.md`` §2.2):

``clean`` (the default) — clean-fid's ``mode="clean"``.
    Each 8-bit image is resized to 299x299 channel by channel with PIL's bicubic filter on a
    float32 ('F' mode) image, clipped to [0, 255] (clean-fid ``make_resizer("PIL", False,
    "bicubic", (299, 299))``), then normalised as ``(x - 128) / 128``.
    Network: clean-fid's TorchScript TF-Inception ``inception-2015-12-05.pt`` (model card
    ``fid_inception_clean``); its ``layers`` module gives the 2048-d pool3 features, exactly as
    clean-fid calls it. Given a pytorch-fid state dict instead (``weights_path`` pointing at
    ``pt_inception-2015-12-05-6726825d.pth``), the same input goes through our reimplementation of
    pytorch-fid's FID-Inception: that is how pyiqa computes its clean FID. The network used is part
    of :attr:`InceptionFeatures.network` and of every record.

``legacy_pytorch`` — pytorch-fid (and clean-fid's ``legacy_pytorch``).
    The 8-bit image as floats in [0, 1], ``F.interpolate(..., (299, 299), mode="bilinear",
    align_corners=False)``, then ``2x - 1``. Network: pytorch-fid's FID-Inception (torchvision's
    Inception-v3 with TF's pooling: average pools that ignore padding in the A/C/E_1 blocks, a max
    pool in the last E block) with weights ``pt_inception-2015-12-05-6726825d.pth`` (model card
    ``fid_inception_pytorch``).

Float images are first quantised to 8 bits (``round(clip(x, 0, 1) * 255)``), so features of a
tensor equal those of the PNG it is saved as: both references read 8-bit files.

Reference statistics come from a stats file (``.npz`` with ``mu``, ``sigma`` and, when written
here, ``n``/``convention``/``source``/``network``), a manifest, or a folder; the last two are
computed once and cached under a key made from the set's content. Features are cached per image
content hash in ``.npz`` shards, so adding images to a set extracts only the new ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn
from torchvision.models import inception as tv_inception

from bfr_models import storage
from bfr_models.models import load_strict, state_dict_from_bytes

FIDConvention = Literal["clean", "legacy_pytorch"]
CONVENTIONS: tuple[str, ...] = get_args(FIDConvention)
DEFAULT_CONVENTION: FIDConvention = "clean"
# Model card of the default network of each convention.
INCEPTION_CARDS: dict[str, str] = {"clean": "fid_inception_clean", "legacy_pytorch": "fid_inception_pytorch"}
FEATURE_DIM = 2048
INPUT_SIZE = (299, 299)
MIN_REFERENCE_IMAGES = FEATURE_DIM  # below this the 2048x2048 covariance is rank-deficient
# Bump when anything that changes feature values changes (preprocessing, network code).
FEATURE_CODE_VERSION = 1
STATS_FORMAT_VERSION = 1


class FIDError(ValueError):
    """A bad FID setup (convention, reference, stats file); the message is one line."""


def check_convention(convention: str) -> FIDConvention:
    if convention not in CONVENTIONS:
        raise FIDError(f"unknown FID convention {convention!r}; use one of: {', '.join(CONVENTIONS)}")
    return convention  # type: ignore[return-value]


def check_reference_size(n: int, allow_small: bool = False) -> None:
    """Refuse a reference set too small for a full-rank 2048-d covariance."""
    if n < MIN_REFERENCE_IMAGES and not allow_small:
        raise FIDError(
            f"FID reference has {n} images; the covariance is rank-deficient below {MIN_REFERENCE_IMAGES} images "
            f"(use a larger reference, or allow_small=True / --allow-small-reference to accept it)"
        )


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``, with scipy's ``sqrtm`` as
    pytorch-fid and clean-fid compute it: when the product is singular enough that the root is
    not finite, ``eps`` is added to both diagonals; an imaginary part from round-off is dropped
    when the diagonal's is below 1e-3, and is an error otherwise.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise FIDError(f"FID: mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise FIDError(f"FID: covariances of shape {sigma1.shape} and {sigma2.shape} do not match means of {mu1.shape}")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = float(np.max(np.abs(covmean.imag)))
            raise FIDError(f"FID: sqrtm(sigma1 @ sigma2) has an imaginary component of {worst:.3g}; the covariances are too ill-conditioned")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # Singular products are handled by the caller (eps offset), as in pytorch-fid.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def stats_from_features(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N-1) covariance of (N, D) features, in float64, as clean-fid/pytorch-fid."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise FIDError(f"FID statistics need an (N>=2, D) feature array, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


# --------------------------------------------------------------------------------------------
# Statistics files
# --------------------------------------------------------------------------------------------


@dataclass
class FIDStats:
    """Gaussian statistics of a feature set plus what makes them comparable."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int  # images behind the statistics; -1 when a foreign stats file does not say
    convention: FIDConvention
    source: str  # what the statistics were computed from (manifest/folder/stats URI)
    network: str = ""  # which Inception produced the features (see InceptionFeatures.network)

    def __post_init__(self):
        check_convention(self.convention)
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)

    @classmethod
    def from_features(cls, feats: np.ndarray, convention: FIDConvention, source: str, network: str = "") -> "FIDStats":
        mu, sigma = stats_from_features(feats)
        return cls(mu, sigma, int(np.asarray(feats).shape[0]), check_convention(convention), source, network)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n), convention=np.str_(self.convention),
            source=np.str_(self.source), network=np.str_(self.network), format_version=np.int64(STATS_FORMAT_VERSION),
        )
        return buf.getvalue()

    def save(self, uri: str | Path) -> None:
        """Write the statistics as one ``.npz`` (whole or not at all), convention and source inside."""
        storage.write_bytes_atomic(str(uri), self.to_bytes())

    @classmethod
    def load(cls, uri: str | Path, convention: FIDConvention | None = None,
             assume_convention: FIDConvention | None = None) -> "FIDStats":
        """Read a stats file; a file of another convention than ``convention`` is an error.

        Files written here record their convention. A foreign file (clean-fid, pyiqa) holding only
        ``mu``/``sigma`` takes its convention from a clean-fid style name (``ffhq_clean_trainval70k_512.npz``)
        or from ``assume_convention``; otherwise it is refused.
        """
        uri = str(uri)
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise FIDError(f"FID stats file not found: {uri}") from None
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            files = set(npz.files)
            if not {"mu", "sigma"} <= files:
                raise FIDError(f"FID stats file {uri} has no 'mu'/'sigma' arrays")
            mu, sigma = npz["mu"], npz["sigma"]
            recorded = str(npz["convention"]) if "convention" in files else None
            n = int(npz["n"]) if "n" in files else -1
            source = str(npz["source"]) if "source" in files else uri
            network = str(npz["network"]) if "network" in files else ""
        except FIDError:
            raise
        except Exception as e:  # noqa: BLE001 - any unreadable npz is a one-line error
            raise FIDError(f"FID stats file {uri} is not a readable .npz: {e}") from None
        if recorded is None:
            recorded = _convention_from_name(uri) or assume_convention
            if recorded is None:
                raise FIDError(f"FID stats file {uri} records no convention; name it clean-fid style "
                               f"(<name>_<convention>_<split>_<res>.npz) or pass assume_convention")
        if recorded not in CONVENTIONS:
            raise FIDError(f"FID stats file {uri} was computed with convention {recorded!r}, which is not supported here")
        if convention is not None and recorded != check_convention(convention):
            raise FIDError(f"FID stats file {uri} was computed with the {recorded!r} convention, not {convention!r}; "
                           f"FIDs of different conventions are not comparable")
        if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
            raise FIDError(f"FID stats file {uri} has mu {mu.shape} / sigma {sigma.shape}, expected ({FEATURE_DIM},) / "
                           f"({FEATURE_DIM}, {FEATURE_DIM})")
        return cls(mu, sigma, n, recorded, source, network)  # type: ignore[arg-type]


def _convention_from_name(uri: str) -> str | None:
    name = uri.rsplit("/", 1)[-1].lower()
    found = [c for c in CONVENTIONS if re.search(rf"(^|_){c}(_|\.npz$)", name)]
    return found[0] if len(found) == 1 else None


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


# --------------------------------------------------------------------------------------------
# Feature cache: per image content hash, in .npz shards
# --------------------------------------------------------------------------------------------


def _short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class FeatureCache:
    """Features keyed by image content hash under ``<root>/fid-features/<extractor>/<shard>.npz``.

    A shard holds ``keys`` and float32 ``feats`` (the network's own precision) and is named by the
    hash of its keys, so writing it twice is harmless and a crashed write leaves nothing behind.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = str(root)
        self.fingerprint = fingerprint
        self.uri = storage.join(self.root, "fid-features", _short_hash(fingerprint))
        self._mem: dict[str, np.ndarray] | None = None
        self._seen: set[str] = set()

    def _shards(self) -> list[str]:
        fs, path = storage.filesystem(self.uri)
        if not fs.exists(path):
            return []
        found = fs.glob(path.rstrip("/") + "/*.npz")
        return sorted(storage.normalize(fs.unstrip_protocol(p)) for p in found)

    def _refresh(self, relist: bool = True) -> dict[str, np.ndarray]:
        if self._mem is None:
            self._mem = {}
        elif not relist:
            return self._mem
        for shard in self._shards():
            if shard in self._seen:
                continue
            try:
                npz = np.load(io.BytesIO(storage.read_bytes(shard)), allow_pickle=False)
                keys, feats = npz["keys"], npz["feats"]
            except Exception:  # noqa: BLE001 - an unreadable shard is recomputed, never trusted
                continue
            for k, f in zip(keys.tolist(), feats):
                self._mem[str(k)] = f
            self._seen.add(shard)
        return self._mem

    def get(self, keys: Iterable[str], relist: bool = True) -> dict[str, np.ndarray]:
        """Cached features of ``keys``; ``relist=False`` answers from the shards already read (no listing)."""
        mem = self._refresh(relist)
        return {k: mem[k] for k in keys if k in mem}

    def put(self, keys: Sequence[str], feats: np.ndarray) -> None:
        if len(keys) == 0:
            return
        feats = np.asarray(feats, dtype=np.float32)
        name = _short_hash("\n".join(sorted(keys)), 24) + ".npz"
        buf = io.BytesIO()
        np.savez(buf, keys=np.array(list(keys), dtype=np.str_), feats=feats)
        uri = storage.join(self.uri, name)
        storage.write_bytes_atomic(uri, buf.getvalue())
        if self._mem is not None:
            for k, f in zip(keys, feats):
                self._mem[k] = f


@dataclass(frozen=True)
class ImageRef:
    """One image to extract features from: its URI and, when known (manifests), its content sha256."""

    uri: str
    sha256: str | None = None


@dataclass
class FeatureSet:
    feats: np.ndarray  # (N, 2048) float64, in input order, errors left out
    keys: list[str]  # content sha256 of each row
    errors: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)
    extracted: int = 0  # how many were computed now (the rest came from the cache)


def _load_rgb(data: bytes) -> np.ndarray:
    from bfr_models.imageio import decode_rgb

    return decode_rgb(data)[0]


def extract_features(refs: Sequence[ImageRef], extractor: InceptionFeatures, cache: FeatureCache | None = None,
                     shard_size: int = 1024, on_progress: Callable[[int, int], None] | None = None) -> FeatureSet:
    """Features of images by URI, reusing cached ones; only images not in the cache are read and run.

    Unreadable images are left out and listed in ``errors`` (the caller decides whether that is fatal).
    New features are written to the cache every ``shard_size`` images, so an interrupted run keeps its work.
    """
    if cache is not None and cache.fingerprint != extractor.fingerprint:
        raise FIDError("feature cache belongs to another extractor (convention/network)")
    # One listing of the cache up front; images without a known hash are looked up in what it read.
    known = cache.get([r.sha256 for r in refs if r.sha256]) if cache is not None else {}
    keys: list[str | None] = [r.sha256 if r.sha256 in known else None for r in refs]
    feats: dict[str, np.ndarray] = dict(known)
    errors: list[tuple[str, str]] = []
    todo = [i for i, k in enumerate(keys) if k is None]
    pending_keys: list[str] = []
    pending_imgs: list[np.ndarray] = []
    new_keys: list[str] = []
    new_feats: list[np.ndarray] = []
    extracted = 0

    def run_batch():
        nonlocal extracted
        if not pending_imgs:
            return
        f = extractor(pending_imgs)
        for k, v in zip(pending_keys, f):
            feats[k] = v
            new_keys.append(k)
            new_feats.append(v)
        extracted += len(pending_imgs)
        pending_keys.clear()
        pending_imgs.clear()

    def flush():
        if cache is not None and new_keys:
            cache.put(list(new_keys), np.stack(new_feats))
        new_keys.clear()
        new_feats.clear()

    for done, i in enumerate(todo):
        if on_progress is not None:
            on_progress(done, len(todo))
        ref = refs[i]
        try:
            data = storage.read_bytes(ref.uri)
        except (OSError, FileNotFoundError) as e:
            errors.append((ref.uri, f"cannot read: {e}"))
            continue
        key = ref.sha256 or storage.sha256_hex(data)
        keys[i] = key
        if key in feats or key in pending_keys:
            continue
        if cache is not None and ref.sha256 is None:
            hit = cache.get([key], relist=False)
            if hit:
                feats.update(hit)
                continue
        try:
            pending_imgs.append(_load_rgb(data))
        except ValueError as e:
            keys[i] = None
            errors.append((ref.uri, str(e)))
            continue
        pending_keys.append(key)
        if len(pending_imgs) >= extractor.batch_size:
            run_batch()
        if len(new_keys) >= shard_size:
            flush()
    run_batch()
    flush()
    ok = [k for k in keys if k is not None and k in feats]
    arr = np.stack([np.asarray(feats[k], dtype=np.float64) for k in ok]) if ok else np.zeros((0, FEATURE_DIM))
    return FeatureSet(arr, ok, errors, extracted)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """A planned FID reference: what it is and how many images it holds, found without any feature work."""

    uri: str
    kind: Literal["stats", "manifest", "folder"]
    n: int
    content_key: str  # hash of what the reference holds (image hashes, or listing versions for folders)
    refs: list[ImageRef] = field(default_factory=list)
    stats: FIDStats | None = None
    allow_small: bool = False


def plan_reference(uri: str | Path, convention: FIDConvention, allow_small: bool = False,
                   assume_convention: FIDConvention | None = None) -> Reference:
    """Resolve a reference (stats ``.npz``, manifest, or image folder) and check it; one-line errors only."""
    from bfr_models import manifest

    uri = str(uri)
    convention = check_convention(convention)
    if uri.lower().endswith(".npz"):
        stats = FIDStats.load(uri, convention=convention, assume_convention=assume_convention)
        if stats.n >= 0:
            check_reference_size(stats.n, allow_small)
        return Reference(uri, "stats", stats.n, "", stats=stats, allow_small=allow_small)
    if manifest.is_manifest(uri):
        df = manifest.read_manifest(uri)
        df = df[df["status"] == "ok"]
        refs = [ImageRef(str(u), s if isinstance(s, str) and s else None) for u, s in zip(df["uri"], df["sha256"])]
        key = _short_hash("\n".join(sorted(r.sha256 or f"uri:{r.uri}" for r in refs)), 32)
        kind = "manifest"
    else:
        try:
            listed = storage.list_images(uri)
        except FileNotFoundError:
            raise FIDError(f"FID reference not found: {uri} (expected a stats .npz, a manifest or an image folder)") from None
        refs = [ImageRef(f.uri) for f in listed]
        key = _short_hash("\n".join(f"{f.uri}\t{f.size}\t{f.version}" for f in listed), 32)
        kind = "folder"
    check_reference_size(len(refs), allow_small)
    return Reference(uri, kind, len(refs), key, refs=refs, allow_small=allow_small)  # type: ignore[arg-type]


def reference_stats(reference: Reference | str | Path, extractor: InceptionFeatures, cache_root: str | Path | None = None,
                    allow_small: bool = False) -> FIDStats:
    """Statistics of a reference; computed ones are cached under ``<cache_root>/fid-stats/`` by content key."""
    ref = reference if isinstance(reference, Reference) else plan_reference(reference, extractor.convention, allow_small)
    allow_small = allow_small or ref.allow_small
    if ref.stats is not None:
        if ref.stats.convention != extractor.convention:
            raise FIDError(f"FID stats {ref.uri} use the {ref.stats.convention!r} convention, not {extractor.convention!r}")
        return ref.stats
    stats_uri = None
    if cache_root is not None:
        name = f"{extractor.convention}-{_short_hash(extractor.fingerprint)}-{ref.content_key[:32]}.npz"
        stats_uri = storage.join(str(cache_root), "fid-stats", name)
        if storage.exists(stats_uri):
            try:
                return FIDStats.load(stats_uri, convention=extractor.convention)
            except FIDError:
                pass  # unreadable cache entry: recompute
    cache = FeatureCache(cache_root, extractor.fingerprint) if cache_root is not None else None
    fs = extract_features(ref.refs, extractor, cache)
    if fs.errors:
        warnings.warn(f"FID reference {ref.uri}: {len(fs.errors)} unreadable images left out "
                      f"(first: {fs.errors[0][0]}: {fs.errors[0][1]})", stacklevel=2)
    check_reference_size(len(fs.keys), allow_small)
    stats = FIDStats.from_features(fs.feats, extractor.convention, ref.uri, extractor.network)
    if stats_uri is not None:
        stats.save(stats_uri)
    return stats


# --------------------------------------------------------------------------------------------
# The score
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FIDResult:
    value: float
    convention: FIDConvention
    reference: str  # the reference's source (stats file / manifest / folder)
    n: int  # images scored
    n_reference: int
    network: str

    def as_record(self) -> dict:
        return {"fid": self.value, "fid_convention": self.convention, "fid_reference": self.reference,
                "fid_n": self.n, "fid_reference_n": self.n_reference, "fid_network": self.network}

    def to_json(self) -> str:
        return json.dumps(self.as_record(), sort_keys=True)


def fid_from_stats(stats: FIDStats, reference: FIDStats) -> FIDResult:
    """FID of ``stats`` against ``reference``; both must share the convention."""
    if stats.convention != reference.convention:
        raise FIDError(f"FID: set uses the {stats.convention!r} convention but the reference uses {reference.convention!r}")
    value = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
    return FIDResult(value, stats.convention, reference.source, stats.n, reference.n, stats.network or reference.network)
