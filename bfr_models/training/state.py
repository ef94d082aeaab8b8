"""What every training loop here shares: resumable state files anywhere fsspec reaches, and EMA."""

from __future__ import annotations

import io

import torch

from bfr_models import storage


def save_state(uri: str, state: dict) -> None:
    """``torch.save`` the whole training state to ``uri`` atomically (a crash never leaves half a file)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes_atomic(uri, buf.getvalue())


def load_state(uri: str, device: str | torch.device = "cpu") -> dict | None:
    """The state saved at ``uri``, or None when there is none yet (a fresh run)."""
    if not storage.exists(uri):
        return None
    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location=device, weights_only=False)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """EMA with diffusers' warm-up, min(decay, (1+step)/(10+step)): a fixed 0.999 would keep ~45% of the
    random init after 800 steps."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1.0 - d)


def resume(uri: str, device, config, objects: dict, what: str, error: type[Exception] = ValueError) -> dict | None:
    """Load the state saved at ``uri`` into ``objects`` (name -> module, optimizer, scheduler or torch.Generator,
    each restored from the entry of that name); None when there is none. A state written with another
    ``config`` is refused: resuming it would silently mix two runs."""
    state = load_state(uri, device)
    if state is None:
        return None
    if state["config"] != config:
        raise error(f"{what}: {uri} was written with a different config; use a new --out")
    for name, obj in objects.items():
        if obj is not None and state.get(name) is not None:
            (obj.set_state if isinstance(obj, torch.Generator) else obj.load_state_dict)(state[name])
    return state
