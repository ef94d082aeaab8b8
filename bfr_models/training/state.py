"""What every training loop here shares: resumable state files anywhere fsspec reaches, and EMA.

A training state is one safetensors file: every tensor (weights, EMA, optimizer moments, RNG states)
under a dotted path, and in the file's metadata header the JSON skeleton of the nested state
(counters, config, scheduler and optimizer settings, log rows) with each tensor replaced by its
path. Nothing is unpickled on resume, and one file written atomically means a crash never leaves a
mix of two checkpoints.
"""

from __future__ import annotations

import collections
import json
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from bfr_models import storage
from bfr_models.weights import safetensors_metadata

STATE_FILE = "checkpoints/train_state.safetensors"
FORMAT = "bfr-curate training state 1"


class StateError(ValueError):
    """A resume state that is missing its parts or is not a training state at all (one line)."""


def _skeleton(value, path: str, tensors: dict):
    """JSON for ``value``; its tensors go to ``tensors[path]``. Containers are tagged so that int dict
    keys (optimizer state), tuples (betas) and Counters (MultiStepLR milestones) come back as they were."""
    if isinstance(value, torch.Tensor):
        # A copy on the CPU: safetensors refuses tensors that share memory (tied weights).
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": path}
    if isinstance(value, dict):
        tag = "counter" if isinstance(value, collections.Counter) else "dict"
        return {tag: [[k, _skeleton(v, f"{path}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_skeleton(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else {"list": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state: cannot store {type(value).__name__} at {path!r}")


def _rebuild(node, tensors: dict):
    if not isinstance(node, dict):
        return node
    (tag, body), = node.items()
    if tag == "tensor":
        return tensors[body]
    if tag in ("dict", "counter"):
        out = {k: _rebuild(v, tensors) for k, v in body}
        return collections.Counter(out) if tag == "counter" else out
    items = [_rebuild(v, tensors) for v in body]
    return tuple(items) if tag == "tuple" else items


def save_state(uri: str, state: dict) -> None:
    """Write the whole training state to ``uri`` atomically (a crash never leaves half a file)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _skeleton(state, "state", tensors)
    data = save_safetensors(tensors, metadata={"format": FORMAT, "state": json.dumps(skeleton)})
    storage.write_bytes_atomic(uri, data)


def load_state(uri: str) -> dict | None:
    """The state saved at ``uri`` (tensors on the CPU), or None when there is none yet (a fresh run).
    Anything but a training state written by :func:`save_state` is refused with :class:`StateError`."""
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:
        metadata = safetensors_metadata(data)
        if metadata is None:
            raise ValueError("not a safetensors file; nothing in it was run")
        if metadata.get("format") != FORMAT:
            raise ValueError("a safetensors file without a training-state header")
        tensors = load_safetensors(data)
        return _rebuild(json.loads(metadata["state"]), tensors)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise StateError(f"{uri} is not a training state written by bfr-curate ({reason})") from None


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with diffusers' warm-up, min(decay, (1+step)/(10+step)): a fixed 0.999 would keep ~45% of the
    random init after 800 steps."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - d)


def resume(uri: str, config, objects: dict, what: str, error: type[Exception] = ValueError) -> dict | None:
    """Load the state saved at ``uri`` into ``objects`` (name -> module, optimizer, scheduler or torch.Generator,
    each restored from the entry of that name); None when there is none. A state written with another
    ``config`` is refused: resuming it would silently mix two runs. Every refusal is one ``error`` line.
    A resumed run says so on stderr ("<what>: resuming from step N"), above any progress bar."""
    try:
        state = load_state(uri)
    except StateError as e:
        raise error(f"{what}: {e}; use a new --out") from None
    if state is None:
        return None
    if state.get("config") != config:
        raise error(f"{what}: {uri} was written with a different config; use a new --out")
    for name, obj in objects.items():
        if obj is not None and state.get(name) is not None:
            (obj.set_state if isinstance(obj, torch.Generator) else obj.load_state_dict)(state[name])
    tqdm.write(f"{what}: resuming from step {state.get('step')} ({uri})", file=sys.stderr)
    return state
