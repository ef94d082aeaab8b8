"""Reading weight files safely: nothing is ever unpickled beyond plain tensors.

safetensors files are read as such; PyTorch files only through ``torch.load(weights_only=True)``. Every
refusal (a pickle with Python objects in it, a truncated or foreign file, a state dict that does not fit
the network) is one ValueError line in our words: torch's own message for a file with Python objects in
it suggests turning the safety off.
"""

from __future__ import annotations

import json
import re

from bfr_models import storage


def _refusal(e: BaseException) -> str:
    """Why a file could not be read, in one line of our words: torch's own message for a file with
    Python objects in it suggests turning the safety off."""
    text = " ".join(str(e).split())
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it holds Python objects besides tensors ({found.group(1)}), and reading those could run code"
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    if found:
        text = found.group(1)
    elif "weights_only" in text or "weights only" in text.lower():
        text = "not readable as plain tensors"
    return text[:200] or type(e).__name__


def torch_load_weights(data: bytes, what: str):
    """``torch.load(weights_only=True)`` of checkpoint bytes (tensors, dicts, lists, numbers only): nothing
    is ever unpickled beyond that. Any refusal is one ValueError line."""
    import io
    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{what} was refused: not a PyTorch file of plain tensors ({_refusal(e)})") from None


def safetensors_metadata(data: bytes) -> dict | None:
    """The ``__metadata__`` of safetensors bytes ({} when it has none), or None if ``data`` is not safetensors.

    Read from the header directly (8-byte little-endian length, then JSON), so any bytes can be asked.
    """
    if len(data) < 10:
        return None
    n = int.from_bytes(data[:8], "little")
    if n < 2 or 8 + n > len(data) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def safetensors_from_bytes(data: bytes, what: str) -> dict:
    """The tensors of safetensors bytes; anything else (a pickle, a truncated file) is one ValueError line."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:
        raise ValueError(f"{what} was refused: not a safetensors file ({_refusal(e)})") from None


def state_dict_from_bytes(data: bytes, what: str) -> dict:
    """A torch state dict from checkpoint bytes: unwraps ``params``/``state_dict``/``model`` and ``module.``."""
    import torch

    obj = torch_load_weights(data, what)
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("params", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not a state dict")
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_state_dict(path: str, what: str) -> dict:
    """Read a checkpoint from a local path or fsspec URL (see ``state_dict_from_bytes``)."""
    try:
        data = storage.read_bytes(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    return state_dict_from_bytes(data, f"{what} {path}")


def load_strict(net, state: dict, what: str, error: type[Exception] = ValueError):
    """Load every tensor of ``state`` into ``net`` (strict); a mismatch is one line naming ``what``."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise error(f"{what}: {first}") from None
    return net
