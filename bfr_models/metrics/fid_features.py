"""FID features of image sets: a content-keyed feature cache, extraction by URI, and reference statistics."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

import numpy as np

from bfr_models import storage
from bfr_models.metrics.fid_network import InceptionFeatures
from bfr_models.metrics.fid_stats import (FEATURE_DIM, FeatureSums, FIDConvention, FIDError, FIDStats, check_convention,
                                         check_reference_size)

# --------------------------------------------------------------------------------------------
# Feature cache: per image content hash, in .npz shards
# --------------------------------------------------------------------------------------------


REFERENCE_CHUNK = 1024  # reference images featurised (or read from the cache) and summed at a time


def _short_hash(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


class FeatureCache:
    """Features keyed by image content hash under ``<root>/fid-features/<extractor>/<shard>.npz``.

    A shard holds ``keys`` and float32 ``feats`` (the network's own precision) and is named by the
    hash of its keys, so writing it twice is harmless and a crashed write leaves nothing behind.
    Only an index (key -> shard file) stays in memory; features are read from their shard when asked
    for, so a cache of a 70k-image reference does not sit in memory.
    """

    def __init__(self, root: str | Path, fingerprint: str):
        self.root = str(root)
        self.fingerprint = fingerprint
        self.uri = storage.join(self.root, "fid-features", _short_hash(fingerprint))
        self._where: dict[str, str] | None = None  # key -> shard URI
        self._seen: set[str] = set()

    def _shards(self) -> list[str]:
        fs, path = storage.filesystem(self.uri)
        if not fs.exists(path):
            return []
        found = fs.glob(path.rstrip("/") + "/*.npz")
        return sorted(storage.normalize(fs.unstrip_protocol(p)) for p in found)

    @staticmethod
    def _read(shard: str) -> tuple[list[str], np.ndarray] | None:
        try:
            npz = np.load(io.BytesIO(storage.read_bytes(shard)), allow_pickle=False)
            return [str(k) for k in npz["keys"].tolist()], npz["feats"]
        except Exception:  # noqa: BLE001 - an unreadable shard is recomputed, never trusted
            return None

    def _refresh(self, relist: bool = True) -> dict[str, str]:
        if self._where is None:
            self._where = {}
        elif not relist:
            return self._where
        for shard in self._shards():
            if shard in self._seen:
                continue
            read = self._read(shard)
            if read is not None:
                self._where.update(dict.fromkeys(read[0], shard))
            self._seen.add(shard)
        return self._where

    def __contains__(self, key: str) -> bool:
        """Whether ``key`` is in the shards already listed (no listing, no read)."""
        return key in self._refresh(relist=False)

    def get(self, keys: Iterable[str], relist: bool = True) -> dict[str, np.ndarray]:
        """Cached features of ``keys`` (each shard holding some is read once per call); ``relist=False``
        answers from the shards already listed."""
        where = self._refresh(relist)
        wanted: dict[str, set[str]] = {}
        for k in keys:
            if k in where:
                wanted.setdefault(where[k], set()).add(k)
        found = {}
        for shard, ks in wanted.items():
            read = self._read(shard)
            if read is not None:
                found.update((k, f) for k, f in zip(*read) if k in ks)
        return found

    def put(self, keys: Sequence[str], feats: np.ndarray) -> None:
        if len(keys) == 0:
            return
        feats = np.asarray(feats, dtype=np.float32)
        name = _short_hash("\n".join(sorted(keys)), 24) + ".npz"
        buf = io.BytesIO()
        np.savez(buf, keys=np.array(list(keys), dtype=np.str_), feats=feats)
        uri = storage.join(self.uri, name)
        storage.write_bytes_atomic(uri, buf.getvalue())
        if self._where is not None:
            self._where.update(dict.fromkeys(keys, uri))
            self._seen.add(uri)


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
    cached: list[str] = []  # keys found in the cache once their image was read (refs without a known hash)
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
        if cache is not None and ref.sha256 is None and key in cache:
            cached.append(key)  # read with the others from its cache shard below
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
    if cached:
        feats.update(cache.get(cached, relist=False))
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
    # in chunks, summed as they come: memory stays one chunk's features whatever the reference's size
    sums, errors = FeatureSums(), []
    for start in range(0, len(ref.refs), REFERENCE_CHUNK):
        fs = extract_features(ref.refs[start : start + REFERENCE_CHUNK], extractor, cache)
        sums.add(fs.feats)
        errors += fs.errors
    if errors:
        warnings.warn(f"FID reference {ref.uri}: {len(errors)} unreadable images left out "
                      f"(first: {errors[0][0]}: {errors[0][1]})", stacklevel=2)
    check_reference_size(sums.n, allow_small)
    stats = FIDStats(*sums.stats(), sums.n, extractor.convention, ref.uri, extractor.network)
    if stats_uri is not None:
        stats.save(stats_uri)
    return stats



# --------------------------------------------------------------------------------------------
# Per-shard feature files: written once by the shard that computed them, read once by the flow
# --------------------------------------------------------------------------------------------


def shard_features_uri(stage_uri: str, shard: str) -> str:
    return storage.join(stage_uri, "fid", f"{shard}.npz")


def write_shard_features(uri: str, fingerprint: str, keys: Sequence[str], feats: np.ndarray) -> None:
    """One shard's features (float32, the network's own precision), in row order, with the extractor's fingerprint."""
    feats = np.asarray(feats, dtype=np.float32).reshape(len(keys), FEATURE_DIM)
    buf = io.BytesIO()
    np.savez(buf, keys=np.array(list(keys), dtype=np.str_), feats=feats, fingerprint=np.str_(fingerprint))
    storage.write_bytes_atomic(uri, buf.getvalue())


def read_shard_features(uri: str, fingerprint: str) -> np.ndarray:
    """The features of a shard file as (N, 2048) float64; a file of another extractor is an error."""
    try:
        npz = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
        found, feats = str(npz["fingerprint"]), npz["feats"]
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreadable file is a one-line error
        raise FIDError(f"FID features {uri} are not a readable .npz: {e}") from None
    if found != fingerprint:
        raise FIDError(f"FID features {uri} come from another extractor ({found}), not {fingerprint}")
    return feats.astype(np.float64)
