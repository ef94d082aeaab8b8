"""Our own checkpoint format for the restorers we build and train (:class:`SmallRestorer`, :class:`SwinIRRestorer`):
one safetensors file, anywhere fsspec reaches.

The file holds the module's float32 state dict; its safetensors metadata (strings only) says what it is::

    {"format": "bfr-curate-restorer", "version": "1", "arch": "small", "config": "{\"blocks\": 4, \"channels\": 32}"}

``config`` is the JSON of the constructor kwargs; ``resolution`` (optional) the square size in pixels the
restorer was fine-tuned at, which ``restore`` applies it at (:func:`trained_resolution`; the finetune stage
writes it into the plain state dicts it saves for spandrel architectures too). The file's sha256 is the restorer's identity in
manifests. Any other file (a safetensors file without this metadata, a ``.pth``) is not ours and is
left to spandrel by :func:`bfr_models.restorers.load_restorer`.
"""

from __future__ import annotations

import json

import torch

from bfr_models import storage
from bfr_models.weights import load_strict, safetensors_metadata
from bfr_models.restorers.errors import RestorerError
from bfr_models.restorers import small, swinir

FORMAT = "bfr-curate-restorer"
VERSION = "1"
RESOLUTION_KEY = "resolution"
ARCHS = {small.ARCH: small.SmallRestorer, swinir.ARCH: swinir.SwinIRRestorer}


def arch_of(model: torch.nn.Module) -> str:
    for name, cls in ARCHS.items():
        if type(model) is cls:
            return name
    raise TypeError(f"not a restorer of our checkpoint format: {type(model).__name__} (known: {', '.join(ARCHS)})")


def restorer_bytes(model: torch.nn.Module, resolution: int | None = None) -> bytes:
    """The checkpoint file's bytes for ``model`` (weights moved to the CPU as float32); ``resolution``: the size
    it was trained at, recorded."""
    from safetensors.torch import save

    arch = arch_of(model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "version": VERSION, "arch": arch, "config": json.dumps(model.config, sort_keys=True),
            **resolution_metadata(resolution)}
    return save(state, metadata=meta)


def resolution_metadata(resolution: int | None) -> dict:
    """The safetensors metadata entry recording a training resolution (none when unknown)."""
    return {RESOLUTION_KEY: str(int(resolution))} if resolution else {}


def trained_resolution(data: bytes) -> int | None:
    """The training resolution a safetensors file records (None: not recorded, or not safetensors)."""
    value = (safetensors_metadata(data) or {}).get(RESOLUTION_KEY)
    return int(value) if value and value.isdigit() else None


def save_restorer(model: torch.nn.Module, path_or_uri: str, resolution: int | None = None) -> str:
    """Write ``model`` as one safetensors file (atomically) to a local path or fsspec URI; return its URI.
    ``resolution``: the size it was trained at, recorded in the file."""
    uri = storage.normalize(str(path_or_uri))
    storage.write_bytes_atomic(uri, restorer_bytes(model, resolution))
    return uri


def is_restorer_checkpoint(data: bytes) -> bool:
    """Whether ``data`` is a file of our format (by its metadata; nothing is validated beyond that)."""
    meta = safetensors_metadata(data)
    return meta is not None and meta.get("format") == FORMAT


def restorer_from_bytes(data: bytes, where: str) -> torch.nn.Module:
    """Build the restorer a checkpoint file describes and load its weights (strict). Raises RestorerError."""
    from safetensors.torch import load

    meta = safetensors_metadata(data)
    if meta is None or meta.get("format") != FORMAT:
        raise RestorerError(f"{where} is not a {FORMAT} checkpoint (a safetensors file whose metadata format is {FORMAT})")
    if meta.get("version") != VERSION:
        raise RestorerError(f"{where}: {FORMAT} version {meta.get('version')!r} is not supported (this build reads {VERSION})")
    arch = meta.get("arch")
    if arch not in ARCHS:
        raise RestorerError(f"{where}: restorer arch {arch!r} is not supported (known: {', '.join(ARCHS)})")
    try:
        config = json.loads(meta.get("config") or "{}")
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        net = ARCHS[arch](**config)
    except (ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RestorerError(f"{where}: bad {arch} config {meta.get('config')!r}: {first}") from None
    try:
        state = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError on truncated/corrupt data
        raise RestorerError(f"{where}: weights are unreadable (truncated or corrupt safetensors: {e})") from None
    return load_strict(net, state, f"restorer checkpoint {where}", RestorerError)


def read_checkpoint(uri: str) -> bytes:
    """A checkpoint's bytes, or a RestorerError saying where it looked / why it could not read it."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise RestorerError(f"restorer checkpoint not found: looked for {uri}") from None
    except IsADirectoryError:
        raise RestorerError(f"restorer checkpoint {uri} is a folder; give the checkpoint file") from None
    except Exception as e:  # permissions, credentials, network
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RestorerError(f"could not read restorer checkpoint {uri}: {first}") from None
    if not data:
        raise RestorerError(f"restorer checkpoint {uri} is empty")
    return data


def load_restorer_module(path_or_uri: str) -> torch.nn.Module:
    """The network of our checkpoint file (local path or fsspec URI), on the CPU, in eval mode."""
    uri = storage.normalize(str(path_or_uri))
    return restorer_from_bytes(read_checkpoint(uri), uri).eval()
