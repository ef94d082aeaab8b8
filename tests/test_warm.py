"""flows/warm.py: a console command loads its stage's networks on a thread of its own while Prefect starts."""

from __future__ import annotations

import threading

import pytest

from flows import warm


@pytest.fixture
def console(monkeypatch):
    monkeypatch.setattr(warm, "_enabled", True)


def _loads():
    seen, done = [], threading.Event()

    def load(*args):
        seen.append((threading.current_thread().name, args))
        done.set()
        raise RuntimeError("a missing model")  # dropped here: the shard task reports its own

    return seen, done, load


def test_a_console_command_warms_on_its_own_thread_and_drops_a_failed_load(console):
    seen, done, load = _loads()
    warm.warm_in_background(None, "cpu", load, "model", "cpu")
    assert done.wait(30) and seen == [("bfr-warm", ("model", "cpu"))]


def test_nothing_is_warmed_for_shards_on_dask_or_a_gpu_or_for_a_python_caller(monkeypatch):
    seen, done, load = _loads()
    monkeypatch.setattr(warm, "_enabled", True)
    warm.warm_in_background("local", "cpu", load, "model")  # the shards load on the Dask workers
    warm.warm_in_background(None, "cuda", load, "model")  # the GPU is the slot holder's (absent here: refused)
    monkeypatch.setattr(warm, "_enabled", False)
    warm.warm_in_background(None, "cpu", load, "model")
    assert not done.wait(0.5) and seen == []
