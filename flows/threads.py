"""Intra-op threads: each shard worker gets the cores divided by the workers that run at once, at least 1.

torch's CPU kernels (and the OpenMP / MKL pools under them) use every core by default, in each worker; with
several shard workers on one machine they oversubscribe the cores (measured on 2 cores: the degrade stage
6x slower, one FFT loop 20x). ``OMP_NUM_THREADS`` in the command's environment overrides the rule.

Thread-pool workers share the flow's process: :func:`shard_threads` sets torch's threads there before the
shards start (a new pool thread takes torch's setting at its first parallel kernel). Dask worker processes
of ``--dask local`` get the rule through their environment (:func:`worker_env`); a cluster of your own keeps
its workers' settings (Dask's default: one thread per worker process). The stage index records the
number the shard tasks used (``config.threads``).

A stage with fewer shards than workers (60 faces make one), or a stage's last shards, would leave cores idle:
there the networks that see one image at a time on the CPU (the diffusion and IDM UNets, MUSIQ) run several
images at once, the samplers around them and the degradations one part of the batch per lane, and the score
stage several batches, whose images take any lane another batch leaves free, each on the same intra-op
threads as in turn (:func:`cpu_lanes`, :func:`spread_idle_cores`), so no image's bytes change.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def intra_op_threads(workers: int, cores: int | None = None) -> int:
    """The rule: ``cores // workers``, at least 1; ``OMP_NUM_THREADS`` set in the environment wins."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (cores or available_cores()) // max(1, workers))


def worker_env(workers: int) -> dict[str, str]:
    """Environment for ``workers`` local Dask worker processes (overrides Dask's default of one thread)."""
    return dict.fromkeys(THREAD_VARIABLES, str(intra_op_threads(workers)))


def torch_threads() -> int:
    """The intra-op threads torch uses in this process (also run on Dask workers to record theirs)."""
    import torch

    return torch.get_num_threads()


def cpu_lanes(workers: int, shards: int, threads: int, cores: int | None = None) -> int:
    """The calls one shard may run at once on the CPU (``bfr_models.device.lane_imap``): the cores that the
    shards running at once (``shards`` of them, at most ``workers``) leave idle at ``threads`` each, at least 1."""
    running = max(1, min(workers, shards))
    return max(1, (cores or available_cores()) // (max(1, threads) * running))


def shard_threads(task_runner, workers: int, shards: int):
    """For a thread pool running ``workers`` of a stage's ``shards`` shard tasks at once: set this process's
    torch threads by the rule, and its CPU lanes (:func:`spread_idle_cores`). Returns the threads the shard tasks
    use, for the stage index: an int, a sorted list if Dask workers differ, None for another runner."""
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    if isinstance(task_runner, ThreadPoolTaskRunner):
        torch.set_num_threads(intra_op_threads(workers))
        spread_idle_cores(task_runner, workers, shards)
        return torch.get_num_threads()
    client = getattr(task_runner, "client", None)  # Dask: ask its workers
    if client is None:
        return None
    found = sorted(set(client.run(torch_threads).values()))
    return found[0] if len(found) == 1 else found


def spread_idle_cores(task_runner, workers: int, shards_left: int) -> None:
    """A thread pool's CPU lanes for ``shards_left`` shards still to finish (:func:`cpu_lanes`): set when the
    shards start and again as each finishes, so the last shards of a stage take the cores of the workers that
    have nothing left to run. Lanes never change an image's bytes. Dask workers keep one lane."""
    import torch
    from prefect.task_runners import ThreadPoolTaskRunner

    from bfr_models.device import set_cpu_lanes

    if isinstance(task_runner, ThreadPoolTaskRunner):
        set_cpu_lanes(cpu_lanes(workers, shards_left, torch.get_num_threads()))
