"""The finetune stage: fine-tune a restorer on (LQ, pseudo target) pairs with L1 + LPIPS + GAN.

Inputs: a pseudo-target manifest (each ok row's parent is its LQ input; error rows are skipped and
counted; ground truth is found through the lineage when the LQ came from a degrade stage) and real HQ
faces for the discriminator. Writes ``<out>/finetune/<key>/``: ``restorer.safetensors`` (loadable by
``restore`` and ``pseudo-targets --restorer``), ``log.parquet`` / ``log.csv`` (one row per step,
validation columns every K steps), resumable checkpoints, and a manifest of the held-out pairs restored
by the final model. Everything is checked before training starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import partial

import torch
from prefect import flow, get_run_logger, task

from bfr_models import manifest, storage
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter, ShardInfo
from bfr_models.metrics.fullref import psnr, ssim
from bfr_models.restorers import CheckpointModel, RestorerError, SpandrelModel, load_restorer, save_restorer
from bfr_models.restorers.checkpoint import ARCHS, resolution_metadata
from bfr_models.restorers.codeformer import CodeFormerRestorer
from bfr_models.training.codeformer import CodeFormerFinetuneConfig, finetune_codeformer
from bfr_models.training.data import UriImages, read_image
from bfr_models.training.finetune import FinetuneError, Pairs, UriPairs, finetune, load_finetune_config
from flows.prior import progress, training_bar, training_images
from flows.run_info import publish_stage_summary, run_name
from flows.score import Lineage
from flows.stage import run_training
from tasks.rows import ok_row, stamp, to_uint8, write_output
from tasks.runtime import key_parameter, local_device, resolve_device, result_storage
from tasks.shards import CODE_VERSION, InputItem, list_inputs, stable_hash

STAGE = "finetune"


def save_state_dict(model: torch.nn.Module, uri: str, resolution: int | None = None) -> None:
    """A spandrel architecture's weights as a plain safetensors state dict (spandrel detects it again), with the
    training ``resolution`` in its metadata."""
    from safetensors.torch import save

    net = model.net if isinstance(model, CodeFormerRestorer) else model  # the adapter holds no weights of its own
    storage.write_bytes_atomic(uri, save({k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()},
                                         metadata=resolution_metadata(resolution)))


def trainable_restorer(spec: str) -> tuple[torch.nn.Module, object, dict]:
    """(network, save function, description) for ``small``, ``swinir`` (fresh) or a checkpoint."""
    if spec in ARCHS:  # a fresh network of an architecture our checkpoint format knows
        net = ARCHS[spec]()
        return net, save_restorer, {"name": spec, "arch": spec, "sha256": None, "config": net.config}
    restorer = load_restorer(spec)
    if isinstance(restorer.model, CodeFormerRestorer):
        return restorer.model, save_state_dict, restorer.describe()
    if isinstance(restorer, CheckpointModel):
        return restorer.model, save_restorer, restorer.describe()
    if isinstance(restorer, SpandrelModel):
        if restorer.scale != 1:
            raise RestorerError(f"{spec} is a x{restorer.scale} {restorer.config['arch_name']} model; fine-tuning "
                                f"needs a same-resolution restorer")
        return restorer.model, save_state_dict, restorer.describe()
    raise RestorerError(f"restorer {spec!r} has no weights to fine-tune (use small, swinir or a checkpoint)")


SIZE_SAMPLE = 8  # pairs decoded to check sizes when the LQ images' manifest does not record them


@dataclass
class PairPlan:
    """The ok pairs of a pseudo-target manifest, sorted by image id, as URIs (nothing decoded): listed once and
    handed to the task. ``gt``: ground truth through the lineage when every LQ came from a degrade stage."""

    lq: list[str]
    target: list[str]
    gt: list[str] | None
    ids: list[str]
    skipped: int
    size: tuple[int, int]  # (height, width) of every pair

    def __post_init__(self):
        self.size = tuple(self.size)

    def __len__(self) -> int:
        return len(self.ids)


def load_pairs(pairs: str, include_failed: bool = False) -> PairPlan:
    """The ok rows of a pseudo-target manifest that passed its quality gate (all ok rows with ``include_failed``)
    as a :class:`PairPlan`; sizes come from the manifests' width and
    height columns (the LQ's from its degrade row, else from decoding a sample of :data:`SIZE_SAMPLE` pairs).

    Raises FinetuneError, before any training, for pairs whose sizes differ (and TrainingDataError for a
    sampled pair that cannot be read); a bad pair outside the sample stops training when the loader reads it.
    """
    if not manifest.is_manifest(pairs):
        raise FinetuneError(f"--pairs must be a pseudo-target manifest (a stage folder with index.json): {pairs}")
    frame = manifest.read_manifest(pairs)
    keep = frame["status"] == "ok"
    if "gate" in frame and not include_failed:  # targets that failed the quality gate are not trained on
        keep &= frame["gate"] == "pass"
    ok = frame[keep].sort_values("image_id")
    skipped = len(frame) - len(ok)
    if ok.empty:
        raise FinetuneError(f"{pairs} has no ok rows that passed the quality gate ({skipped} error or gate-failed "
                            f"rows; --include-failed trains on failed targets too)")
    lineage, gts, sizes = Lineage(), [], []
    for row in ok.to_dict("records"):
        chain = list(lineage.chain(row))
        parent = chain[1] if len(chain) > 1 else None
        gts.append(parent["parent_uri"] if parent is not None and parent.get("stage") == "degrade" else None)
        lq_size = (int(parent["height"]), int(parent["width"])) if parent is not None and parent.get("width") else None
        sizes.append(((int(row["height"]), int(row["width"])), lq_size))
    unknown = [i for i, (_, lq) in enumerate(sizes) if lq is None]
    for i in unknown[:SIZE_SAMPLE]:  # a bounded sample: the rest is checked as the loader reads them
        lq, target = (read_image(ok[c].iloc[i]) for c in ("parent_uri", "uri"))
        sizes[i] = (tuple(target.shape[-2:]), tuple(lq.shape[-2:]))
    sizes = [(t, lq if lq is not None else t) for t, lq in sizes]
    differ = [i for i, (a, b) in enumerate(sizes) if a != b]
    if differ:
        i = differ[0]
        raise FinetuneError(f"{len(differ)} pairs whose sizes differ (first: LQ {ok['parent_uri'].iloc[i]} is "
                            f"{sizes[i][1][1]}x{sizes[i][1][0]}, its target {sizes[i][0][1]}x{sizes[i][0][0]}); "
                            f"fine-tuning needs same-size pairs")
    if len({s for s, _ in sizes}) > 1:
        raise FinetuneError(f"pairs come in {len({s for s, _ in sizes})} sizes; fine-tuning needs one size")
    return PairPlan(lq=[str(u) for u in ok["parent_uri"]], target=[str(u) for u in ok["uri"]],
                    gt=[str(g) for g in gts] if all(gts) else None, ids=[str(i) for i in ok["image_id"]],
                    skipped=skipped, size=sizes[0][0])


def split(plan: PairPlan, val_pairs: int) -> tuple[UriPairs, Pairs | None]:
    """Training pairs (read as batches need them) and the last ``val_pairs`` (by image id) held out for
    validation: a bounded sample, read once into memory."""
    cut = len(plan) - val_pairs  # at least 1: checked by plan_finetune
    train = UriPairs(plan.lq[:cut], plan.target[:cut])
    if not val_pairs:
        return train, None

    def stack(uris):
        return torch.stack([read_image(u) for u in uris[cut:]])

    return train, Pairs(lq=stack(plan.lq), target=stack(plan.target), gt=stack(plan.gt) if plan.gt else None)


def finetune_config(config: str, restorer_net: torch.nn.Module, no_lpips: bool = False, **overrides):
    """The config to train ``restorer_net`` with: ``auto`` picks the CodeFormer recipe for CodeFormer, else the
    image-level one; a mismatch is refused (the code-level recipe is specific to CodeFormer, spec §2.3).
    ``no_lpips``: the recipe's LPIPS term dropped (``lpips_weight`` 0), for a machine without its backbone."""
    is_codeformer = isinstance(restorer_net, CodeFormerRestorer)
    name = ("codeformer" if is_codeformer else "unsupervised_bfr") if config == "auto" else config
    cfg = load_finetune_config(name, **overrides)
    if no_lpips and "lpips_weight" in {f.name for f in fields(cfg)}:
        cfg = replace(cfg, lpips_weight=0.0)
    if is_codeformer != isinstance(cfg, CodeFormerFinetuneConfig):
        raise FinetuneError(f"finetune config {name} is the {'codeformer' if not is_codeformer else 'image'}-level "
                            f"recipe, but the restorer is {'' if is_codeformer else 'not '}a CodeFormer "
                            f"(use --config auto)")
    return cfg


def plan_finetune(pairs: str, restorer: str, real: str | None, config: str, overrides: dict,
                  exclude: tuple[str, ...] | list[str] = (), plan: PairPlan | None = None,
                  include_failed: bool = False, no_lpips: bool = False, real_uris: list[str] | None = None):
    """Everything checked before any work. Returns (pair plan, network, save, info, reals, config).

    ``plan`` and ``real_uris``: the pairs and real faces listed already (by the flow, for its task): they are
    not listed again (listing a folder reads every file once, to find duplicates). The save
    function records the pairs' size in the restorer file: ``restore`` applies it at that size."""
    plan = load_pairs(pairs, include_failed) if plan is None else plan
    net, save, info = trainable_restorer(restorer)
    save = partial(save, resolution=plan.size[0])
    cfg = finetune_config(config, net, no_lpips, **overrides)
    height, size = plan.size
    multiple = getattr(net, "pad_multiple", 1)
    if height % multiple or size % multiple:
        raise FinetuneError(f"{info['arch']} needs sides that are multiples of {multiple}; pairs are "
                            f"{size}x{height}")
    if cfg.val_pairs and len(plan) - cfg.val_pairs < 1:
        raise FinetuneError(f"{len(plan)} pairs leave none to train on after holding out val_pairs={cfg.val_pairs}")
    if height != size:
        raise FinetuneError(f"pairs are {size}x{height}: only square pairs are supported "
                            f"(real faces are resized to the pair size)")
    if getattr(cfg, "lpips_weight", 0) > 0:
        from bfr_models.metrics.lpips_metric import BACKBONE_CARDS
        from bfr_models.models import ModelMissingError, model_path

        try:
            model_path(BACKBONE_CARDS[cfg.lpips_net])
        except ModelMissingError as e:  # names the file and the pull command; offline, the flag goes on without
            raise ModelMissingError(f"{e}; or train without the LPIPS term: finetune --no-lpips", e.missing,
                                    e.looked_in) from None
    reals = None
    if getattr(cfg, "gan_weight", 0) > 0:
        if not real:
            raise FinetuneError("--real (HQ faces for the discriminator) is required by the image-level recipe")
        if not storage.exists(real):
            raise FileNotFoundError(f"--real not found: {real}")
        reals = training_images(real, size, exclude) if real_uris is None else UriImages(real_uris, size)
        if len(reals) < cfg.batch_size:
            raise FinetuneError(f"--real has {len(reals)} images, fewer than the batch ({cfg.batch_size}); "
                                f"the discriminator needs at least a batch of real faces")
    return plan, net, save, info, reals, cfg


@task(name="finetune-train", cache_key_fn=key_parameter, persist_result=True,
      result_serializer="json")  # a checkable record, never a pickle (tasks.runtime.key_parameter)
def finetune_task(key: str, pairs: str, restorer: str, real: str | None, config: str, overrides: dict, out: str,
                  device: str, exclude: list[str], plan: dict, loader_workers: int | None = None,
                  no_lpips: bool = False, real_uris: list[str] | None = None) -> dict:
    plan, net, save, info, reals, cfg = plan_finetune(pairs, restorer, real, config, overrides, exclude,
                                                      PairPlan(**plan), no_lpips=no_lpips, real_uris=real_uris)
    train, val = split(plan, cfg.val_pairs)
    ids = list(zip(plan.ids, plan.lq))
    dev = resolve_device(device)  # here: on Dask, the worker's device
    lpips_net = _lpips(cfg, dev)
    with training_bar(cfg.iters, "finetune", "it") as bar:
        report = progress(bar, cfg.iters, key)

        def on_step(step: int, row: dict) -> None:
            report(step, row["loss"])

        if isinstance(cfg, CodeFormerFinetuneConfig):
            log = finetune_codeformer(net, train, val, cfg, out, lpips_net=lpips_net, device=dev, save=save,
                                      on_step=on_step, workers=loader_workers)
        else:
            log = finetune(net, train, val, reals, cfg, out, lpips_net=lpips_net, device=dev, save=save,
                           on_step=on_step, workers=loader_workers)
    writer = ManifestWriter(out)
    rows = []
    if val is not None:
        rows = _validation_rows(net, val, ids[len(train):], writer, lpips_net, dev)
    shard = writer.write_shard("validation", rows)
    last = log.dropna(subset=[c for c in log.columns if c.startswith("val_")][:1]).tail(1)
    final = {k: float(v) for k, v in last.iloc[0].items() if str(k).startswith("val_")} if len(last) else {}
    return {"shard": asdict(shard), "restorer_uri": storage.join(out, "restorer.safetensors"),
            "log_uri": storage.join(out, "log.parquet"), "final_validation": final, "restorer": info,
            "train_pairs": len(train), "val_pairs": len(val) if val is not None else 0, "resolution": plan.size[0]}


def _lpips(cfg, dev):
    """The LPIPS module for the loss and validation; None when its weights are missing and the loss needs none."""
    from bfr_models.metrics.lpips_metric import LPIPS
    from bfr_models.models import ModelMissingError

    try:
        return LPIPS(getattr(cfg, "lpips_net", "vgg"), device=dev).model
    except ModelMissingError:
        if getattr(cfg, "lpips_weight", 0) > 0:
            raise
        return None


@torch.no_grad()
def _validation_rows(net, val: Pairs, ids, writer, lpips_net, dev) -> list[dict]:
    """The held-out pairs restored by the final model, scored against their pseudo targets (and ground truth)."""
    net.eval()
    out = torch.cat([net(val.lq[i:i + 8].to(dev)).float().clamp(0, 1).cpu() for i in range(0, len(val), 8)])
    scores = {"psnr": psnr(out, val.target), "ssim": ssim(out, val.target) if min(out.shape[-2:]) >= 11 else None}
    if lpips_net is not None:
        scores["lpips"] = lpips_net(out.to(dev), val.target.to(dev), normalize=True).flatten().cpu()
    if val.gt is not None:
        scores["psnr_gt"] = psnr(out, val.gt)
    rows = []
    for b, (image_id, lq_uri) in enumerate(ids):
        rgb = to_uint8(out[b])
        rows.append(ok_row(STAGE, InputItem(lq_uri, "-"), image_id, write_output(writer, encode_png(rgb), image_id),
                           rgb, split="validation", **{k: float(v[b]) for k, v in scores.items() if v is not None}))
    return stamp(rows, dev)


@flow(name="finetune", flow_run_name=run_name)
def finetune_flow(pairs: str, restorer: str, out: str, real: str | None = None, config: str = "auto",
                  iters: int | None = None, batch_size: int | None = None, micro_batch: int | None = None,
                  lr: float | None = None, val_pairs: int | None = None, validate_every: int | None = None,
                  checkpoint_every: int | None = None, precision: str | None = None, seed: int | None = None,
                  device: str = "auto", exclude: tuple[str, ...] | list[str] = (),
                  loader_workers: int | None = None, include_failed: bool = False, no_lpips: bool = False) -> str:
    """Fine-tune `restorer` on the pairs; returns the stage folder (restorer, log, validation manifest).
    `no_lpips`: without the recipe's LPIPS term (L1 + GAN), where the LPIPS backbone is not available.

    Pairs are read by `loader_workers` DataLoader processes as batches need them (None: from the cores).

    ``config`` names a catalogs/finetune YAML (``auto``: the CodeFormer recipe for CodeFormer checkpoints,
    else the image-level one); the other arguments override its values.
    """
    overrides = dict(iters=iters, batch_size=batch_size, micro_batch=micro_batch, lr=lr, val_pairs=val_pairs,
                     validate_every=validate_every, checkpoint_every=checkpoint_every, precision=precision, seed=seed)
    # the real faces listed once, here, and handed to the plan and the task
    real_items = list_inputs(real, exclude)[0] if real and storage.exists(real) else None
    real_uris = [i.uri for i in real_items] if real_items is not None else None
    plan, _, _, info, reals, cfg = plan_finetune(pairs, restorer, real, config, overrides, exclude,
                                                 include_failed=include_failed, no_lpips=no_lpips, real_uris=real_uris)
    skipped = plan.skipped
    local_device(device)  # a device this machine lacks fails here, before any work (on Dask: on the worker)
    get_run_logger().info("finetune: %d pairs (%d error rows skipped), %s real faces, %s, %s", len(plan), skipped,
                          "no" if reals is None else len(reals), info["arch"], type(cfg).__name__)
    key = stable_hash([STAGE, type(cfg).__name__, asdict(cfg), manifest.read_index(pairs)["key"],
                       [(i.uri, i.version) for i in real_items] if reals is not None else [], info.get("sha256") or info.get("name"),
                       include_failed], length=12)
    where = storage.join(storage.normalize(out), STAGE, key)
    result = run_training(
        finetune_task.with_options(result_storage=result_storage(where)), desc="finetune", total=cfg.iters,
        unit="it", key=stable_hash([where, CODE_VERSION]), pairs=pairs, restorer=restorer, real=real, config=config,
        overrides=overrides, out=where, device=device, exclude=list(exclude), plan=asdict(plan),
        loader_workers=loader_workers, no_lpips=no_lpips, real_uris=real_uris if reals is not None else None)
    index_config = {"finetune": asdict(cfg), "recipe": type(cfg).__name__, "pairs": pairs, "real": real,
                    "skipped_pairs": skipped, "include_failed": include_failed, "no_lpips": no_lpips,
                    **{k: v for k, v in result.items() if k != "shard"}}
    ManifestWriter(where).write_index(STAGE, key, index_config, [ShardInfo(**result["shard"])])
    publish_stage_summary(where)
    return where
