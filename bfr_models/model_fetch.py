"""Getting model files into the cache: :func:`pull`, the only function that downloads (``bfr-curate models
pull``), and :func:`add`, which registers a file the user already has (``bfr-curate models add``). Both go
through :func:`bfr_models.models.copy_verified`: nothing enters the cache unless its sha256 matches its card."""

from __future__ import annotations

from pathlib import Path

from bfr_models import storage
from bfr_models.models import (ModelCard, ModelDownloadError, ModelHashError, copy_verified, check_cached, get_card,
                               shared_cache, state)


def _publish(card: ModelCard, path: Path) -> Path:
    """With a :func:`shared_cache`, upload a verified file there too, so every node finds it."""
    shared = shared_cache()
    if shared:
        fs, remote = storage.filesystem(storage.join(shared, card.filename))
        fs.put_file(str(path), remote)
    return path


def _reason(e: BaseException, url: str) -> str:
    """The useful part of a download failure: fsspec often raises FileNotFoundError(url) around the real cause."""
    chain, c = [], e
    while c is not None and len(chain) < 8:
        chain.append(c)
        c = c.__cause__ or c.__context__
    root = chain[-1]
    text = " ".join(str(root).split())
    if root is e and isinstance(e, FileNotFoundError) and text.strip("'\"") in ("", url, storage.filesystem(url)[1]):
        text = "not found"
    elif root is not e:
        text = f"{type(root).__name__}: {text}" if text else type(root).__name__
    text = text or type(root).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def pull(name: str, source: str | None = None, *, progress: bool = True, force: bool = False) -> Path:
    """Download a model's file into the cache through fsspec and verify it. The only function that downloads.

    ``source`` overrides the card's URL (any fsspec URL or path); without it the card's URL and then its
    ``extra.mirror_urls`` are tried in turn. A file already in the cache with the right hash is kept
    unless ``force``. A file whose hash differs raises ModelHashError and leaves nothing in the cache.
    """
    card = get_card(name)
    if not force and state(card) != "missing":
        try:
            return check_cached(card)
        except ModelHashError:
            pass  # a wrong file in the cache: fetch the right one over it
    failures = []
    for url in ([source] if source else card.urls):
        try:
            return _publish(card, copy_verified(card, url, progress))
        except ModelHashError:
            raise
        except Exception as e:  # network, 404, credentials: try the next mirror
            failures.append(f"{url}: {_reason(e, url)}")
    raise ModelDownloadError(
        f"could not download model '{name}' ({card.filename}): {'; '.join(failures)}. "
        f"If this machine has no internet, get the file onto it another way and run `bfr-curate models add {name} --from PATH`")


def add(name: str, from_path: str | Path, *, progress: bool = True) -> Path:
    """Register a file the user already has: verify its hash and copy it into the cache."""
    card = get_card(name)
    src = str(from_path)
    if not storage.exists(src):
        raise FileNotFoundError(f"cannot add model '{name}': {src} does not exist")
    fs, path = storage.filesystem(src)
    if fs.isdir(path):
        raise FileNotFoundError(f"cannot add model '{name}': {src} is a folder; give the file {card.filename}")
    try:
        return _publish(card, copy_verified(card, src, progress))
    except ModelHashError:
        raise
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ModelDownloadError(f"cannot add model '{name}': reading {src} failed: {_reason(e, src)}") from None
