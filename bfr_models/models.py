"""Model cards and the local model cache: every weight file a stage uses, fetched only on request.

Each weight file has a card, ``catalogs/models/<name>.yaml``::

    name: musiq_koniq                      # must equal the file's stem
    filename: musiq_koniq_ckpt-e95806b9.pth
    url: https://huggingface.co/.../musiq_koniq_ckpt-e95806b9.pth   # any fsspec URL
    sha256: e95806b9...                    # the full sha256, or instead
    # hash_prefix: e95806b9                # the start of the sha256 its published name carries
    license: PolyForm-Noncommercial-1.0.0
    used_by: [score/musiq]
    description: where the file and its hash come from
    extra: {size_bytes: 108610983, mirror_urls: [...]}   # optional

Nothing downloads unless :func:`bfr_models.model_fetch.pull` is called (``bfr-curate models pull``). Stages call
:func:`require` before any work, which raises :class:`ModelMissingError` naming every missing file,
where it looked and the command that fetches it.

The cache is a flat folder (``BFR_CURATE_MODEL_CACHE``, default ``~/.cache/bfr-curate/models``)
holding each file under its card's ``filename``. Next to each verified file sits a small hidden
record (``.<filename>.verified.json``: sha256, size, mtime) so a file is hashed once, not on
every stage start; a file copied into the cache by hand is hashed on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from bfr_models import storage
from bfr_models.choices import PUBLISHED_CATALOGS, catalogs_dir

CHUNK = 1 << 20  # bytes per read while downloading / hashing

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_FIELDS = ("name", "filename", "url", "sha256", "hash_prefix", "license", "used_by", "description", "extra")
_REQUIRED = ("filename", "url", "license", "used_by", "description")


class ModelCardError(ValueError):
    """A malformed model card, or a model name no card describes."""


class ModelMissingError(FileNotFoundError):
    """A weight file a stage needs is not in the model cache. The message is one line."""

    def __init__(self, message: str, missing: list["ModelCard"] | None = None, looked_in: Path | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
        self.looked_in = looked_in

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):  # survive pickling across Dask / Prefect workers
        return (self.__class__, (self.args[0], self.missing, self.looked_in))


class ModelHashError(ValueError):
    """A file's sha256 differs from its card."""


class ModelDownloadError(FileNotFoundError):
    """A weight file could not be read from its URL (no network, 404, no credentials)."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class ModelCard:
    name: str
    filename: str
    url: str
    sha256: str | None
    hash_prefix: str | None
    license: str
    used_by: list[str]
    description: str
    extra: dict = field(default_factory=dict)

    @property
    def pinned(self) -> bool:
        """Whether the card names a hash to check files against (``sha256: unpinned`` cards do not)."""
        return self.sha256 is not None or self.hash_prefix is not None

    def matches(self, digest: str) -> bool:
        """Whether a file whose sha256 is ``digest`` is the file this card describes."""
        digest = digest.lower()
        if not self.pinned:  # no published hash to check against: any file is accepted, never "verified"
            return True
        if self.sha256 is not None:
            return digest == self.sha256
        return digest.startswith(self.hash_prefix)

    @property
    def expected(self) -> str:
        """The hash requirement in words, for messages."""
        if not self.pinned:
            return "no hash (unpinned card)"
        if self.sha256 is not None:
            return f"sha256 {self.sha256}"
        return f"a sha256 starting with {self.hash_prefix}"

    @property
    def urls(self) -> list[str]:
        """The card's URL, then any ``extra.mirror_urls``, in the order pull tries them."""
        return [self.url, *self.extra.get("mirror_urls", [])]


# --------------------------------------------------------------------------- cards


def _card_error(path: Path, field_name: str, problem: str) -> ModelCardError:
    return ModelCardError(f"model card {path}: field '{field_name}' {problem}")


def parse_card(path: Path, data) -> ModelCard:
    """Validate one card's parsed YAML. Raises ModelCardError naming the file and field."""
    if not isinstance(data, dict):
        raise ModelCardError(f"model card {path}: expected a mapping of fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise _card_error(path, unknown[0], f"is not a card field (fields: {', '.join(_FIELDS)})")
    for key in _REQUIRED:
        if key not in data or data[key] is None:
            raise _card_error(path, key, "is missing")

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _card_error(path, "name", "must be lowercase letters, digits, '_', '-' or '.'")
    if name != path.stem:
        raise _card_error(path, "name", f"is '{name}' but the file is {path.name}; they must match")

    filename = data["filename"]
    if (not isinstance(filename, str) or not filename or filename.startswith(".")
            or "/" in filename or "\\" in filename):
        raise _card_error(path, "filename", "must be a plain file name (no folders, not hidden)")

    url = data["url"]
    if not isinstance(url, str) or not url.strip():
        raise _card_error(path, "url", "must be a non-empty URL or path")

    sha256, prefix = data.get("sha256"), data.get("hash_prefix")
    unpinned = str(sha256).lower() == "unpinned" and prefix is None
    if unpinned:
        sha256 = None
    elif (sha256 is None) == (prefix is None):
        raise _card_error(path, "sha256", "or 'hash_prefix' must be given, exactly one of them (or sha256: unpinned)")
    if sha256 is not None:
        sha256 = str(sha256).lower()
        if len(sha256) != 64 or not _HEX_RE.match(sha256):
            raise _card_error(path, "sha256", "must be 64 hex digits")
    if prefix is not None:
        prefix = str(prefix).lower()
        if not 8 <= len(prefix) < 64 or not _HEX_RE.match(prefix):
            raise _card_error(path, "hash_prefix", "must be 8 to 63 hex digits (the start of the sha256)")

    lic = data["license"]
    if not isinstance(lic, str) or not lic.strip():
        raise _card_error(path, "license", "must be a non-empty string")
    used_by = data["used_by"]
    if (not isinstance(used_by, list) or not used_by
            or not all(isinstance(u, str) and u.strip() for u in used_by)):
        raise _card_error(path, "used_by", "must be a non-empty list of strings")
    desc = data["description"]
    if not isinstance(desc, str) or not desc.strip():
        raise _card_error(path, "description", "must be a non-empty string")
    extra = data.get("extra") or {}
    if not isinstance(extra, dict):
        raise _card_error(path, "extra", "must be a mapping")
    mirrors = extra.get("mirror_urls", [])
    if not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
        raise _card_error(path, "extra", "mirror_urls must be a list of URLs")
    size = extra.get("size_bytes")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise _card_error(path, "extra", "size_bytes must be a positive integer")

    return ModelCard(name=name, filename=filename, url=url.strip(), sha256=sha256, hash_prefix=prefix,
                     license=lic.strip(), used_by=[u.strip() for u in used_by], description=desc.strip(),
                     extra=dict(extra))


def load_card(path: Path) -> ModelCard:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ModelCardError(f"model card {path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_card(Path(path), data)


def load_cards(catalog_dir: str | Path | None = None) -> dict[str, ModelCard]:
    """Every card in ``<catalogs>/models/*.yaml``, by name (sorted)."""
    root = Path(catalog_dir).expanduser() if catalog_dir is not None else catalogs_dir()
    folder = root / "models"
    if not folder.is_dir():
        return {}
    cards: dict[str, ModelCard] = {}
    by_file: dict[str, str] = {}
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        if path.name.startswith("."):
            continue
        card = load_card(path)
        if card.name in cards:
            raise _card_error(path, "name", f"'{card.name}' is described by another card too")
        if card.filename in by_file:
            raise _card_error(path, "filename",
                              f"'{card.filename}' is also the file of card '{by_file[card.filename]}'")
        cards[card.name] = card
        by_file[card.filename] = card.name
    return dict(sorted(cards.items()))


def write_catalog(files: dict[str, bytes], cache: Path, catalog: Path) -> dict[str, str]:
    """For weights you built yourself (the tests' and benchmarks' random-weight networks): a model cache
    holding ``files`` (card name -> bytes) under each published card's file name, and a catalog whose cards
    are the published ones with these files' sha256 (the other cards as published, their files absent; the
    catalog's other folders are the published ones). Returns the environment that points bfr-curate at both."""
    import yaml

    published_root = PUBLISHED_CATALOGS
    published = load_cards(published_root)
    cache.mkdir(parents=True, exist_ok=True)
    (catalog / "models").mkdir(parents=True, exist_ok=True)
    for other in published_root.iterdir():  # presets, metrics, recipes ... stay the published ones
        if other.is_dir() and other.name != "models" and not (catalog / other.name).exists():
            (catalog / other.name).symlink_to(other)
    for name, card in published.items():
        if name not in files:
            (catalog / "models" / f"{name}.yaml").write_text((published_root / "models" / f"{name}.yaml").read_text())
            continue
        (cache / card.filename).write_bytes(files[name])
        fields = {"name": name, "filename": card.filename, "url": card.url,
                  "sha256": hashlib.sha256(files[name]).hexdigest(), "license": card.license,
                  "used_by": card.used_by, "description": "weights built locally (not the published file)"}
        (catalog / "models" / f"{name}.yaml").write_text(yaml.safe_dump(fields))
    return {"BFR_CURATE_MODEL_CACHE": str(cache), "BFR_CURATE_CATALOGS": str(catalog)}


def get_card(name: str, cards: dict[str, ModelCard] | None = None) -> ModelCard:
    cards = load_cards() if cards is None else cards
    if name not in cards:
        known = ", ".join(cards) or "none"
        raise ModelCardError(f"unknown model '{name}' (known models in {catalogs_dir() / 'models'}: {known})")
    return cards[name]


# --------------------------------------------------------------------------- cache


def shared_cache() -> str | None:
    """The model cache's URL when ``BFR_CURATE_MODEL_CACHE`` names a store (``s3://bucket/models``): one cache
    every node of a cluster reaches. Each process pulls the files it needs from it into a local temp folder
    (:func:`model_cache_dir`), checking each against its card's sha256. None for a local cache folder."""
    env = os.environ.get("BFR_CURATE_MODEL_CACHE")
    return env.rstrip("/") if env and not storage.is_local(env) else None


def model_cache_dir() -> Path:
    """The local cache folder: ``BFR_CURATE_MODEL_CACHE``, ``~/.cache/bfr-curate/models`` by default, or with a
    :func:`shared_cache`, a temp folder of this machine holding what was pulled from it."""
    env = os.environ.get("BFR_CURATE_MODEL_CACHE")
    shared = shared_cache()
    if shared:
        return Path(tempfile.gettempdir()) / f"bfr-curate-models-{hashlib.sha256(shared.encode()).hexdigest()[:12]}"
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bfr-curate" / "models"


def _shared_copy(card: ModelCard) -> str | None:
    """The card's file in the shared cache, if there is one and it holds the file."""
    shared = shared_cache()
    return storage.join(shared, card.filename) if shared and storage.exists(storage.join(shared, card.filename)) \
        else None


def cached_path(card: ModelCard) -> Path:
    """Where the card's file lives in the cache (whether or not it is there)."""
    return model_cache_dir() / card.filename


def _record_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified.json")


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_record(path: Path, digest: str) -> None:
    record = {"sha256": digest, **_stat_key(path)}
    storage.write_bytes_atomic(str(_record_path(path)), json.dumps(record, sort_keys=True).encode())


def _recorded_digest(path: Path) -> str | None:
    """The sha256 recorded for ``path`` if the record still matches its size and mtime."""
    try:
        record = json.loads(_record_path(path).read_text())
        if record.get("size") == (key := _stat_key(path))["size"] and record.get("mtime_ns") == key["mtime_ns"]:
            return record.get("sha256")
    except (OSError, ValueError):
        pass
    return None


def file_sha256(uri: str | Path) -> str:
    """Streamed sha256 of a local file or fsspec URL."""
    fs, path = storage.filesystem(str(uri))
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(path: str | Path, card: ModelCard) -> str:
    """The sha256 of ``path``; raises ModelHashError if it is not the card's file."""
    digest = file_sha256(path)
    if not card.matches(digest):
        raise ModelHashError(f"{path} is not the file of model '{card.name}': "
                             f"its sha256 is {digest}, the card expects {card.expected}")
    return digest


def check_result(card: ModelCard, digest: str) -> str:
    """What checking a file whose sha256 is ``digest`` established, for messages. A file of an unpinned
    card is never called verified: nothing was checked."""
    return f"verified {card.expected}" if card.pinned else f"sha256 not pinned: {digest}"


def cached_check_result(card: ModelCard, path: Path) -> str:
    """:func:`check_result` of a file in the cache (its recorded sha256, or hashed now)."""
    return check_result(card, _recorded_digest(path) or file_sha256(path))


def state(card: ModelCard) -> str:
    """'verified', 'unpinned' (present, hashed, but the card has no hash to check against), 'unverified'
    (present, not hashed yet) or 'missing'. Never hashes."""
    path = cached_path(card)
    if not path.is_file():
        return "unverified" if _shared_copy(card) else "missing"
    digest = _recorded_digest(path)
    if digest is None or not card.matches(digest):
        return "unverified"
    return "verified" if card.pinned else "unpinned"


_WARNED_UNPINNED: set[str] = set()


def _warn_unpinned(card: ModelCard, digest: str, path: Path) -> None:
    """Say once per process that a model is used unchecked, with the hash to pin."""
    if not card.pinned and card.name not in _WARNED_UNPINNED:
        _WARNED_UNPINNED.add(card.name)
        print(f"bfr-curate: model '{card.name}' ({path}): {check_result(card, digest)} "
              f"(pin it in its card to have it checked)", file=sys.stderr)


def check_cached(card: ModelCard) -> Path:
    """The cached file, hashed once if it has no valid record. Raises ModelMissingError / ModelHashError."""
    path = cached_path(card)
    if not path.is_file():
        source = _shared_copy(card)
        if source is None:
            raise _missing_error([card])
        try:
            path = copy_verified(card, source, progress=False)  # checked against the card while copied
        except ModelHashError as e:
            raise ModelHashError(f"the shared model cache holds a wrong file: {e}") from None
    digest = _recorded_digest(path)
    if digest is None or not card.matches(digest):
        try:
            digest = verify(path, card)
        except ModelHashError:
            raise ModelHashError(
                f"the cached file {path} of model '{card.name}' has the wrong content (expected {card.expected}); "
                f"delete it and run `bfr-curate models pull {card.name}`") from None
        _write_record(path, digest)
    _warn_unpinned(card, digest, path)
    return path


def _missing_error(missing: list[ModelCard]) -> ModelMissingError:
    cache = shared_cache() or model_cache_dir()
    where = f"looked in {cache} (set BFR_CURATE_MODEL_CACHE to look elsewhere)"
    if len(missing) == 1:
        c = missing[0]
        msg = (f"model '{c.name}' is missing: it needs the file {c.filename}, not found in the model cache; {where}. "
               f"Fetch it with `bfr-curate models pull {c.name}`, or register a copy you have with "
               f"`bfr-curate models add {c.name} --from PATH`")
    else:
        files = ", ".join(f"{c.name} needs {c.filename}" for c in missing)
        names = " ".join(c.name for c in missing)
        msg = (f"{len(missing)} model files are missing ({files}); {where}. "
               f"Fetch them with `bfr-curate models pull {names}`, or register copies you have with "
               f"`bfr-curate models add NAME --from PATH`")
    return ModelMissingError(msg, missing, cache)


def missing_record(metric: str, card: str, error: ModelMissingError) -> dict:
    """What a manifest's index records, and the report lists, for a metric not computed for want of its file."""
    return {"metric": metric, "reason": "weights missing", "needs": get_card(card).filename,
            "command": f"bfr-curate models pull {card}", "detail": str(error)}


def model_path(name: str) -> Path:
    """The verified local path of a model's file. Raises ModelMissingError if it is not in the cache."""
    return check_cached(get_card(name))


def missing(names: Iterable[str]) -> list[ModelCard]:
    """The cards among ``names`` whose file is not in the cache (no hashing, nothing raised for missing)."""
    cards = load_cards()
    return [c for c in (get_card(n, cards) for n in names) if state(c) == "missing"]


def require(names: Iterable[str]) -> dict[str, Path]:
    """Check several models at once, before any work: their verified paths, or one error naming every missing file."""
    cards = load_cards()
    wanted = [get_card(n, cards) for n in dict.fromkeys(names)]
    absent = [c for c in wanted if state(c) == "missing"]
    if absent:
        raise _missing_error(absent)
    return {c.name: check_cached(c) for c in wanted}


# --------------------------------------------------------------------------- copying into the cache


def _open_source(url: str):
    """``(file, size or None)`` for reading ``url`` front to back."""
    fs, path = storage.filesystem(url)
    kwargs = {}
    try:
        from fsspec.implementations.http import HTTPFileSystem

        if isinstance(fs, HTTPFileSystem):
            kwargs["block_size"] = 0  # stream; servers without Range support would otherwise be re-read per block
    except ImportError:  # aiohttp not installed: no http(s) anyway
        pass
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise
    except Exception:  # some servers answer no HEAD / no Content-Length: stream without a total
        size = None
    return fs.open(path, "rb", **kwargs), (int(size) if size else None)


def copy_verified(card: ModelCard, source: str, progress: bool) -> Path:
    """Stream ``source`` into a temp file in the cache while hashing it; verify; rename into place."""
    from tqdm import tqdm

    cache = model_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / card.filename
    tmp = cache / f".{card.filename}.{uuid.uuid4().hex}.part"
    h = hashlib.sha256()
    try:
        f, size = _open_source(source)
        size = size or card.extra.get("size_bytes")
        with f, open(tmp, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=card.filename, disable=not progress, file=sys.stderr,
                                             leave=False) as bar:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if not card.matches(digest):
            raise ModelHashError(f"{source} is not the file of model '{card.name}': its sha256 is {digest}, "
                                 f"the card expects {card.expected}; nothing was stored")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    _write_record(dest, digest)
    return dest
