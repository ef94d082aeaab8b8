"""Priors as a stage: train a small domain prior on a manifest, or convert a guided-diffusion checkpoint."""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task
from tqdm.auto import tqdm

from bfr_models import storage
from bfr_models.diffusion.prior import save_prior
from bfr_models.diffusion.train import PriorTrainConfig, train_prior
from bfr_models.training.data import UriImages
from flows.run_info import publish_model_summary, run_name
from flows.stage import run_training
from tasks.rows import made_where
from tasks.runtime import key_parameter, local_device, on_dask_worker, report_images, resolve_device, result_storage
from tasks.shards import CODE_VERSION, list_inputs, stable_hash

STAGE = "prior"
LOSS_EVERY = 20  # steps between progress-bar updates: reading the loss waits for the device


def training_images(input: str, resolution: int, exclude: tuple[str, ...] | list[str] = ()) -> UriImages:
    """The images of a manifest or folder, read and resized to ``resolution`` when a batch needs them."""
    items, _ = list_inputs(input, exclude)
    return UriImages([i.uri for i in items], resolution)


@task(name="prior-train", cache_key_fn=key_parameter, persist_result=True,
      result_serializer="json")  # a checkable record, never a pickle (tasks.runtime.key_parameter)
def train_task(key: str, input: str, config: dict, out: str, device: str, exclude: list[str],
               loader_workers: int | None = None) -> str:
    """Train (resuming from the last checkpoint under ``out``) and return the prior's URI. The prior folder
    records where it was trained (:func:`tasks.rows.made_where`)."""
    cfg = PriorTrainConfig(**{**config, "channels": tuple(config["channels"])})
    dev = resolve_device(device)  # here: on Dask, the worker's device
    with training_bar(cfg.steps, "prior train", "step") as bar:
        return train_prior(training_images(input, cfg.resolution, exclude), cfg, out, device=dev,
                           on_step=progress(bar, cfg.steps, key), workers=loader_workers, source=made_where(dev))


def training_bar(total: int, desc: str, unit: str):
    """A training task's progress bar; hidden on a Dask worker, whose steps reach the command's bar as events
    (:func:`progress`, :func:`flows.stage.run_training`)."""
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=on_dask_worker())


def progress(bar, last: int, key: str, every: int = LOSS_EVERY):
    """An ``on_step`` that reads the loss (a device sync) only every ``every`` steps, for ``bar`` and, on a
    Dask worker, for the command's bar (events under the training task's ``key``)."""
    shown = 0

    def on_step(step: int, loss) -> None:
        nonlocal shown
        if step % every == 0 or step == last:
            bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            bar.update(step - shown)
            report_images(key, step - shown)
            shown = step

    return on_step


def train_location(items, config: PriorTrainConfig, out: str) -> str:
    """``<out>/prior/<key>``: same inputs and config, same folder (and a resumable checkpoint there)."""
    key = stable_hash([STAGE, asdict(config), [(i.uri, i.version) for i in items]], length=12)
    return storage.join(storage.normalize(out), STAGE, key)


@flow(name="prior-train", flow_run_name=run_name)
def prior_train_flow(input: str, out: str, resolution: int = 64, steps: int = 2000, batch_size: int = 16,
                     lr: float = 2e-4, channels: tuple[int, ...] = (32, 64, 64), checkpoint_every: int = 500,
                     seed: int = 0, device: str = "auto", exclude: tuple[str, ...] | list[str] = (),
                     loader_workers: int | None = None) -> str:
    """Train a small UNet2DModel prior on the images of `input`; returns the prior folder's URI.

    Images are read through a DataLoader with `loader_workers` processes (None: from the cores)."""
    config = PriorTrainConfig(resolution=resolution, steps=steps, batch_size=batch_size, lr=lr,
                              channels=tuple(channels), checkpoint_every=checkpoint_every, seed=seed)
    local_device(device)  # a device this machine lacks fails here, before any work (on Dask: on the worker)
    items, skipped = list_inputs(input, exclude)
    if not items:
        raise ValueError(f"prior train: no images in {input}")
    where = train_location(items, config, out)
    get_run_logger().info("prior train: %d images (%d error rows skipped) -> %s", len(items), skipped, where)
    key = stable_hash([where, asdict(config), CODE_VERSION])
    uri = run_training(train_task.with_options(result_storage=result_storage(where)), desc="prior train",
                       total=config.steps, unit="step", key=key, input=input, config=asdict(config), out=where,
                       device=device, exclude=list(exclude), loader_workers=loader_workers)
    publish_model_summary(STAGE, uri, {"input": input, "images": len(items), **asdict(config)})
    return uri


def convert_adm(checkpoint: str, arch: str, out: str) -> str:
    """A guided-diffusion checkpoint -> a prior folder (every tensor's shape checked on the way)."""
    from bfr_models import models, weights
    from bfr_models.diffusion.adm import convert_adm_state_dict

    state = weights.load_state_dict(checkpoint, "ADM checkpoint")
    unet = convert_adm_state_dict(state, arch)
    variance = "learned_range" if int(unet.config.out_channels) == 6 else "fixed_large"
    return save_prior(unet, out, variance_type=variance,
                      source={"converted_from": storage.normalize(checkpoint), "format": "guided-diffusion",
                              "arch": arch, "checkpoint_sha256": models.file_sha256(checkpoint)})

