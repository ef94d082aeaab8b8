"""The restore stage: any restorer (built-in, our checkpoints, spandrel) over a manifest or folder, batched."""

from __future__ import annotations

from prefect import flow, get_run_logger

from bfr_models import storage
from flows.run_info import run_name
from flows.stage import run_stage, skipped_record
from tasks.pseudo_targets import cached_restorer
from tasks.restore import STAGE, restore_shard
from tasks.runtime import host_gpu_slot, local_device
from tasks.shards import list_inputs


def plan_restore(input: str, restorer: str, device: str):
    """Before any work: the input exists and the restorer loads (RestorerError says what spandrel can load)."""
    if not storage.exists(input):
        raise FileNotFoundError(f"input not found: {input}")
    return cached_restorer(restorer, str(local_device(device)))


@flow(name="restore", flow_run_name=run_name)
def restore_flow(input: str, out: str, restorer: str, shard_size: int = 256, batch_size: int = 8,
                 device: str = "auto", exclude: tuple[str, ...] | list[str] = ()) -> str:
    """Restore every ok row of `input` with `restorer`; returns the manifest URI."""
    model = plan_restore(input, restorer, device)
    items, skipped = list_inputs(input, exclude)
    get_run_logger().info("restore: %d inputs (%d skipped) with %s", len(items), skipped, model)
    config = {"restorer": model.describe()}
    with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
        return run_stage(restore_shard, STAGE, config, items, input, out, shard_size,
                         finalize=lambda *_: skipped_record(input, skipped, exclude), restorer=restorer,
                         device=device, batch_size=batch_size)
