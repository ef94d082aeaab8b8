"""Degrade and score on a Dask LocalCluster of 1 vs 2 worker processes: speed-up, and the Prefect/Dask overhead
per shard (issue 15).

    python benchmarks/dask.py [--n 1024] [--px 256] [--shard-size 256] [--workers 1,2]

Writes ``--n`` distinct synthetic faces, then for each worker count starts a LocalCluster (worker processes,
one thread each, as ``--dask local`` does), imports the stage modules on every worker (start-up is not what is
measured) and runs degrade (dr2 mild, x4) and score (psnr, ssim against the faces) into a fresh output folder.

Per stage it reports the wall time, images/s and, from the Prefect API's record of the flow run and its shard
task runs (start and end of each Running state):

- the mean shard time (a task run's Running state: the shard's own work and its result record);
- the overhead per shard with one worker: the mean gap between one shard task run ending and the next
  starting on the worker (the next shards are already queued there, so the gap is what each shard costs
  beyond its work: Dask handing over the task, Prefect's task engine building its context, API client and
  task-run record, the cache-key check), and that gap as a share of the time a shard of exactly
  ``--shard-size`` images takes (the task time per image times the shard size: the shards themselves are
  cut by content, so their lengths vary between half and twice the size);
- the flow's fixed cost, paid once per stage whatever the shard count: flow start to the first shard
  (planning: listing inputs, cutting shards) plus the last shard's end to the flow's end (the index).

The speed-up is the 1-worker wall time over the 2-worker one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path, where this file would shadow the dask package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def write_faces(folder: Path, n: int, px: int) -> None:
    from tests.conftest import face_like, write_png

    folder.mkdir(parents=True)
    for i in range(n):
        write_png(folder / f"face_{i:05d}.png", face_like(i, size=px))


def _warm() -> None:
    import tasks.degrade  # noqa: F401
    import tasks.score  # noqa: F401


def shard_timing(flow_run_id) -> dict:
    """Seconds of a flow run's shard task runs, from the Prefect API: ``shard`` (mean Running time), ``gap``
    (mean time between one shard's end and the next one's start, in start order: with one worker, the
    per-shard overhead) and ``fixed`` (flow start to the first shard plus the last shard to the flow's end)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    runs = []
    with get_client(sync_client=True) as client:
        while page := client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                            sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=200, offset=len(runs)):
            runs += page  # the API returns at most 200 a call
        flow = client.read_flow_run(flow_run_id)
    runs.sort(key=lambda r: r.start_time)
    gaps = [(b.start_time - a.end_time).total_seconds() for a, b in zip(runs, runs[1:])]
    fixed = (runs[0].start_time - flow.start_time) + (flow.end_time - max(r.end_time for r in runs))
    return {"shards": len(runs), "shard": sum(r.total_run_time.total_seconds() for r in runs) / len(runs),
            "gap": sum(gaps) / max(1, len(gaps)), "fixed": fixed.total_seconds()}


def timed(flow_fn, runner, **params) -> tuple[str, float, dict]:
    start = time.perf_counter()
    state = flow_fn.with_options(task_runner=runner)(**params, return_state=True)
    wall = time.perf_counter() - start
    return state.result(), wall, shard_timing(state.state_details.flow_run_id)


def run(workers: int, faces: Path, out: Path, shard_size: int) -> dict:
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    from flows.runners import local_api_env, local_cluster_kwargs
    from flows.degrade import degrade_flow
    from flows.score import score_flow

    with LocalCluster(**local_cluster_kwargs(workers, local_api_env())) as cluster, Client(cluster) as client:
        client.run(_warm)
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        degraded, wall_d, tasks_d = timed(degrade_flow, runner, input=str(faces), out=str(out), preset="dr2",
                                          split="mild", scale=4, shard_size=shard_size, device="cpu")
        _, wall_s, tasks_s = timed(score_flow, runner, input=degraded, out=str(out), metrics="psnr,ssim",
                                   reference=str(faces), shard_size=shard_size, device="cpu")
    return {"degrade": (wall_d, tasks_d), "score": (wall_s, tasks_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--px", type=int, default=256)  # the smallest size the priors work at
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker process, as a cluster slot
    with tempfile.TemporaryDirectory(prefix="bfr-dask-bench-") as tmp:
        faces = Path(tmp) / "faces"
        write_faces(faces, args.n, args.px)
        results = {w: run(w, faces, Path(tmp) / f"out-{w}", args.shard_size)
                   for w in (int(v) for v in args.workers.split(","))}
    print(f"{args.n} images of {args.px} px, shards of {args.shard_size}, cpu count {os.cpu_count()}")
    print(f"| stage | workers | wall s | images/s | shards | mean shard s | {args.shard_size}-image shard s "
          f"| overhead per shard s | of a {args.shard_size}-image shard | flow fixed s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workers, stages in results.items():
        for stage, (wall, t) in stages.items():
            # with more workers than one, gaps in start order interleave workers: not a per-shard overhead
            full = t["shard"] * t["shards"] / args.n * args.shard_size  # task time of a shard-size shard
            gap = f"{t['gap']:.3f} | {100 * t['gap'] / full:.1f} %" if workers == 1 else "- | -"
            print(f"| {stage} | {workers} | {wall:.1f} | {args.n / wall:.1f} | {t['shards']} | {t['shard']:.2f} "
                  f"| {full:.2f} | {gap} | {t['fixed']:.2f} |")
    counts = sorted(results)
    if len(counts) >= 2:
        for stage in ("degrade", "score"):
            print(f"speed-up {stage} {counts[0]} -> {counts[-1]} workers: "
                  f"{results[counts[0]][stage][0] / results[counts[-1]][stage][0]:.2f}x")


if __name__ == "__main__":
    main()
