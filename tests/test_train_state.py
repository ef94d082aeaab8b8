"""Training state files: safetensors + a JSON skeleton, nothing pickled, and a resume continues exactly."""

from __future__ import annotations

import collections

import pytest
import torch

from bfr_models import storage
from bfr_models.training.state import load_state, resume, save_state

SCHEDULERS = {
    "multistep": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5),
    "lambda": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-4),
}


def _run(uri: str, kind: str, stop: int, total: int = 6) -> torch.nn.Module:
    """A tiny loop shaped like ours: model, Adam, scheduler, generator; checkpoint every step; stop early."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    sched = SCHEDULERS[kind](opt)
    gen = torch.Generator().manual_seed(1)
    config = {"kind": kind, "betas": (0.9, 0.99)}
    state = resume(uri, config, {"model": net, "optimizer": opt, "scheduler": sched, "generator": gen}, "test")
    step = 0 if state is None else state["step"]
    while step < min(stop, total):
        x = torch.randn(5, 4, generator=gen)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        save_state(uri, {"config": config, "step": step, "model": net.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "generator": gen.get_state(), "log": [{"step": step}]})
    return net


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path, kind):
    whole = _run(str(tmp_path / "a.safetensors"), kind, stop=6)
    uri = str(tmp_path / "b.safetensors")
    _run(uri, kind, stop=3)  # "killed" after step 3
    resumed = _run(uri, kind, stop=6)
    # Exact equality is guaranteed here: the same process and the same ops, in the same order, on the
    # restored bits (every tensor and number round-trips exactly).
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_state_round_trips_types_and_is_one_safetensors_file(tmp_path):
    uri = str(tmp_path / "s.safetensors")
    tied = torch.arange(6.0)
    state = {"config": {"betas": (0.9, 0.999), "n": None, "lr": 1e-4}, "step": 7,
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": tied}}, "param_groups": [{"params": [0]}]},
             "milestones": collections.Counter({2: 1, 4: 1}), "same": tied, "rng": torch.get_rng_state(),
             "log": [{"step": 1, "loss": float("nan")}]}
    save_state(uri, state)
    assert storage.read_bytes(uri)[8:9] == b"{"  # a safetensors header, not a pickle or zip
    back = load_state(uri)
    assert back["config"] == state["config"] and isinstance(back["config"]["betas"], tuple)
    assert list(back["optimizer"]["state"]) == [0] and torch.equal(back["optimizer"]["state"][0]["exp_avg"], tied)
    assert isinstance(back["milestones"], collections.Counter) and back["milestones"][3] == 0
    assert back["rng"].dtype == torch.uint8 and torch.equal(back["rng"], state["rng"])
    assert back["log"][0]["step"] == 1 and back["log"][0]["loss"] != back["log"][0]["loss"]  # NaN survives


def test_a_different_config_or_a_foreign_file_is_one_line(tmp_path):
    uri = str(tmp_path / "s.safetensors")
    save_state(uri, {"config": {"a": 1}, "step": 1})
    with pytest.raises(ValueError, match="written with a different config; use a new --out"):
        resume(uri, {"a": 2}, {}, "prior train")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, uri)  # a safetensors file, but not a training state
    with pytest.raises(ValueError) as e:
        resume(uri, {"a": 1}, {}, "prior train")
    assert str(e.value).startswith(f"prior train: {uri} is not a training state written by bfr-curate")
    assert "\n" not in str(e.value)
