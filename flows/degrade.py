"""The degrade stage as a Prefect flow."""

from __future__ import annotations

from prefect import flow, get_run_logger

from bfr_models.degradations import load_preset
from flows.run_info import run_name
from flows.stage import run_stage, skipped_record
from tasks.degrade import STAGE, degrade_shard
from tasks.runtime import host_gpu_slot
from tasks.shards import list_inputs


def degrade_config(preset: str, split: str | None, scale: float | None, seed: int) -> dict:
    """Validate the arguments (fails fast, one line) and return the stage's config."""
    degradation = load_preset(preset, split=split, scale=scale)
    return {"preset": degradation.config, "seed": seed}


@flow(name="degrade", flow_run_name=run_name)
def degrade_flow(input: str, out: str, preset: str = "gfpgan", split: str | None = None,
                 scale: float | None = None, seed: int = 0, shard_size: int = 256, batch_size: int = 8,
                 device: str = "auto", exclude: tuple[str, ...] | list[str] = ()) -> str:
    """Degrade every image of `input` with a preset; returns the manifest URI."""
    config = degrade_config(preset, split, scale, seed)
    items, skipped = list_inputs(input, exclude)
    logger = get_run_logger()
    logger.info("degrade: %d inputs (%d skipped), preset %s", len(items), skipped, preset)
    with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
        return run_stage(degrade_shard, STAGE, config, items, input, out, shard_size,
                         finalize=lambda *_: skipped_record(input, skipped, exclude), preset=preset, split=split,
                         scale=scale, seed=seed, device=device, batch_size=batch_size)
