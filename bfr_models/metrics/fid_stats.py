"""FID statistics: conventions, Gaussian statistics of feature sets, stats files, the Frechet distance.

See :mod:`bfr_models.metrics.fid` for the conventions.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from scipy import linalg

from bfr_models import storage

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


class FeatureSums:
    """Mean and covariance of a feature set that arrives in parts (one per score shard), in float64.

    Each part is reduced to (n, mean, centred sum of outer products); parts merge with Chan et al.'s
    pairwise update, so the result is the unbiased (N-1) covariance of all the rows, as
    :func:`stats_from_features` gives for them at once, without ever holding every feature.
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.n = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros((dim, dim), dtype=np.float64)

    def add(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.mean.shape[0]:
            raise FIDError(f"FID features of shape {feats.shape}, expected (N, {self.mean.shape[0]})")
        n_b = feats.shape[0]
        if n_b == 0:
            return
        mean_b = feats.mean(axis=0)
        centred = feats - mean_b
        m2_b = centred.T @ centred
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + np.outer(delta, delta) * (self.n * n_b / n)
        self.mean += delta * (n_b / n)
        self.n = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise FIDError(f"FID statistics need at least 2 images, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


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
