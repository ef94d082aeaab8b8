"""The ingest stage: a folder of photos -> aligned face crops and their manifest."""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.run_info import run_name
from flows.stage import run_stage, skipped_record
from tasks.ingest import STAGE, ingest_shard
from tasks.runtime import host_gpu_slot
from tasks.shards import list_inputs


@flow(name="ingest", flow_run_name=run_name)
def ingest_flow(input: str, out: str, size: int = 512, min_score: float = 0.9, min_size: int = 32,
                shard_size: int = 64, batch_size: int = 4, device: str = "auto",
                exclude: tuple[str, ...] | list[str] = ()) -> str:
    """Detect, align (FFHQ five-point) and crop every face of every photo; returns the manifest URI."""
    items, skipped = list_inputs(input, exclude)
    get_run_logger().info("ingest: %d photos (%d skipped)", len(items), skipped)
    config = {"size": size, "min_score": min_score, "min_size": min_size}
    with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
        return run_stage(ingest_shard, STAGE, config, items, input, out, shard_size,
                         finalize=lambda *_: skipped_record(input, skipped, exclude), size=size, min_score=min_score,
                         min_size=min_size, device=device, batch_size=batch_size)
