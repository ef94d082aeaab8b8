"""The finetune stage: fine-tune a restorer on (LQ, pseudo target) pairs with L1 + LPIPS + GAN.

Inputs: a pseudo-target manifest (each ok row's parent is its LQ input; error rows are skipped and
counted; ground truth is found through the lineage when the LQ came from a degrade stage) and real HQ
faces for the discriminator. Writes ``<out>/finetune/<key>/``: ``restorer.safetensors`` (loadable by
``restore`` and ``pseudo-targets --restorer``), ``log.parquet`` / ``log.csv`` (one row per step,
validation columns every K steps), resumable checkpoints, and a manifest of the held-out pairs restored
by the final model. Everything is checked before training starts.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from prefect import flow, get_run_logger, task
from tqdm.auto import tqdm

from bfr_models import manifest, storage
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter, ShardInfo
from bfr_models.metrics.fullref import psnr, ssim
from bfr_models.restorers import CheckpointModel, RestorerError, SpandrelModel, load_restorer, save_restorer
from bfr_models.restorers.checkpoint import ARCHS
from bfr_models.restorers.codeformer import CodeFormerRestorer
from bfr_models.training.codeformer import CodeFormerFinetuneConfig, finetune_codeformer
from bfr_models.training.finetune import FinetuneError, Pairs, finetune, load_finetune_config
from flows.prior import load_training_images
from flows.score import Lineage
from tasks.rows import decode_items, ok_row, to_uint8, write_output
from tasks.runtime import key_parameter, resolve_device, result_storage
from tasks.shards import CODE_VERSION, InputItem, list_inputs, read_many, stable_hash

STAGE = "finetune"


def save_state_dict(model: torch.nn.Module, uri: str) -> None:
    """A spandrel architecture's weights as a plain safetensors state dict (spandrel detects it again)."""
    from safetensors.torch import save

    net = model.net if isinstance(model, CodeFormerRestorer) else model  # the adapter holds no weights of its own
    storage.write_bytes_atomic(uri, save({k: v.detach().cpu().float().contiguous() for k, v in net.state_dict().items()}))


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


def load_pairs(pairs: str, include_failed: bool = False) -> tuple[Pairs, list[str], int]:
    """The ok rows of a pseudo-target manifest that passed its quality gate (all ok rows with ``include_failed``)
    as tensors (sorted by image id), their (image id, LQ uri), and the skipped count.

    Raises FinetuneError, before any training, for pairs whose sizes differ or that cannot be read.
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
    lineage, gts = Lineage(), []
    for row in ok.to_dict("records"):
        chain = list(lineage.chain(row))
        gts.append(chain[1]["parent_uri"] if len(chain) > 1 and chain[1].get("stage") == "degrade" else None)
    uris = list(ok["uri"]) + list(ok["parent_uri"]) + [g for g in gts if g]
    decoded, bad = decode_items(STAGE, [InputItem(u, "-") for u in uris], read_many(uris))
    if bad:
        raise FinetuneError(f"{len(bad)} pair images cannot be read (first: {bad[0]['parent_uri']}: {bad[0]['error']})")
    images = {item.uri: rgb for item, _, rgb, _ in decoded}
    sizes = [(images[t].shape, images[l].shape) for t, l in zip(ok["uri"], ok["parent_uri"])]
    differ = [i for i, (a, b) in enumerate(sizes) if a != b]
    if differ:
        i = differ[0]
        raise FinetuneError(f"{len(differ)} pairs whose sizes differ (first: LQ {ok['parent_uri'].iloc[i]} is "
                            f"{sizes[i][1][1]}x{sizes[i][1][0]}, its target {sizes[i][0][1]}x{sizes[i][0][0]}); "
                            f"fine-tuning needs same-size pairs")
    if len({s for s, _ in sizes}) > 1:
        raise FinetuneError(f"pairs come in {len({s for s, _ in sizes})} sizes; fine-tuning needs one size")

    def stack(uris):
        return torch.from_numpy(np.stack([images[u] for u in uris])).permute(0, 3, 1, 2).float() / 255.0

    have_gt = all(gts)
    return (Pairs(lq=stack(ok["parent_uri"]), target=stack(ok["uri"]), gt=stack(gts) if have_gt else None),
            list(zip(ok["image_id"], ok["parent_uri"])), skipped)


def split(pairs: Pairs, val_pairs: int) -> tuple[Pairs, Pairs | None]:
    """The last ``val_pairs`` (by image id) are held out for validation."""
    n = len(pairs)
    if val_pairs and n - val_pairs < 1:
        raise FinetuneError(f"{n} pairs leave none to train on after holding out val_pairs={val_pairs}")
    cut = n - val_pairs

    def part(sl):
        return Pairs(pairs.lq[sl], pairs.target[sl], pairs.gt[sl] if pairs.gt is not None else None)

    return part(slice(0, cut)), (part(slice(cut, n)) if val_pairs else None)


def finetune_config(config: str, restorer_net: torch.nn.Module, **overrides):
    """The config to train ``restorer_net`` with: ``auto`` picks the CodeFormer recipe for CodeFormer, else the
    image-level one; a mismatch is refused (the code-level recipe is specific to CodeFormer, spec §2.3)."""
    is_codeformer = isinstance(restorer_net, CodeFormerRestorer)
    name = ("codeformer" if is_codeformer else "unsupervised_bfr") if config == "auto" else config
    cfg = load_finetune_config(name, **overrides)
    if is_codeformer != isinstance(cfg, CodeFormerFinetuneConfig):
        raise FinetuneError(f"finetune config {name} is the {'codeformer' if not is_codeformer else 'image'}-level "
                            f"recipe, but the restorer is {'' if is_codeformer else 'not '}a CodeFormer "
                            f"(use --config auto)")
    return cfg


def plan_finetune(pairs: str, restorer: str, real: str | None, config: str, overrides: dict,
                  exclude: tuple[str, ...] | list[str] = (), include_failed: bool = False):
    """Everything checked before any work. Returns (pairs, ids, skipped, network, save, info, reals, config)."""
    data, ids, skipped = load_pairs(pairs, include_failed)
    net, save, info = trainable_restorer(restorer)
    cfg = finetune_config(config, net, **overrides)
    size = data.lq.shape[-1]
    multiple = getattr(net, "pad_multiple", 1)
    if data.lq.shape[-2] % multiple or size % multiple:
        raise FinetuneError(f"{info['arch']} needs sides that are multiples of {multiple}; pairs are "
                            f"{data.lq.shape[-1]}x{data.lq.shape[-2]}")
    split(data, cfg.val_pairs)
    if data.lq.shape[-2] != size:
        raise FinetuneError(f"pairs are {size}x{data.lq.shape[-2]}: only square pairs are supported "
                            f"(real faces are resized to the pair size)")
    if getattr(cfg, "lpips_weight", 0) > 0:
        from bfr_models.metrics.lpips_metric import BACKBONE_CARDS
        from bfr_models.models import model_path

        model_path(BACKBONE_CARDS[cfg.lpips_net])  # ModelMissingError names the file and the pull command
    reals = None
    if getattr(cfg, "gan_weight", 0) > 0:
        if not real:
            raise FinetuneError("--real (HQ faces for the discriminator) is required by the image-level recipe")
        if not storage.exists(real):
            raise FileNotFoundError(f"--real not found: {real}")
        reals, _ = load_training_images(real, size, exclude)
        if reals.shape[0] < cfg.batch_size:
            raise FinetuneError(f"--real has {reals.shape[0]} images, fewer than the batch ({cfg.batch_size}); "
                                f"the discriminator needs at least a batch of real faces")
        reals = (reals + 1) / 2
    return data, ids, skipped, net, save, info, reals, cfg


@task(name="finetune-train", cache_key_fn=key_parameter, persist_result=True,
      result_serializer="json")  # a checkable record, never a pickle (tasks.runtime.key_parameter)
def finetune_task(key: str, pairs: str, restorer: str, real: str | None, config: str, overrides: dict, out: str,
                  device: str, exclude: list[str], include_failed: bool = False) -> dict:
    data, ids, _, net, save, info, reals, cfg = plan_finetune(pairs, restorer, real, config, overrides, exclude,
                                                              include_failed)
    train, val = split(data, cfg.val_pairs)
    dev = resolve_device(device)
    lpips_net = _lpips(cfg, dev)
    with tqdm(total=cfg.iters, desc="finetune", unit="it", dynamic_ncols=True) as bar:
        def on_step(step: int, row: dict) -> None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
            bar.update(step - bar.n)

        if isinstance(cfg, CodeFormerFinetuneConfig):
            log = finetune_codeformer(net, train, val, cfg, out, lpips_net=lpips_net, device=dev, save=save,
                                      on_step=on_step)
        else:
            log = finetune(net, train, val, reals, cfg, out, lpips_net=lpips_net, device=dev, save=save,
                           on_step=on_step)
    writer = ManifestWriter(out)
    rows = []
    if val is not None:
        rows = _validation_rows(net, val, ids[len(train):], writer, lpips_net, dev)
    shard = writer.write_shard("validation", rows)
    last = log.dropna(subset=[c for c in log.columns if c.startswith("val_")][:1]).tail(1)
    final = {k: float(v) for k, v in last.iloc[0].items() if str(k).startswith("val_")} if len(last) else {}
    return {"shard": asdict(shard), "restorer_uri": storage.join(out, "restorer.safetensors"),
            "log_uri": storage.join(out, "log.parquet"), "final_validation": final, "restorer": info,
            "train_pairs": len(train), "val_pairs": len(val) if val is not None else 0}


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
        png = encode_png(rgb)
        rows.append(ok_row(STAGE, InputItem(lq_uri, "-"), image_id, write_output(writer, png, image_id), png,
                           rgb, split="validation", **{k: float(v[b]) for k, v in scores.items() if v is not None}))
    return rows


@flow(name="finetune")
def finetune_flow(pairs: str, restorer: str, out: str, real: str | None = None, config: str = "auto",
                  iters: int | None = None, batch_size: int | None = None, micro_batch: int | None = None,
                  lr: float | None = None, val_pairs: int | None = None, validate_every: int | None = None,
                  checkpoint_every: int | None = None, precision: str | None = None, seed: int | None = None,
                  device: str = "auto", exclude: tuple[str, ...] | list[str] = (), include_failed: bool = False) -> str:
    """Fine-tune `restorer` on the pairs; returns the stage folder (restorer, log, validation manifest).

    ``config`` names a catalogs/finetune YAML (``auto``: the CodeFormer recipe for CodeFormer checkpoints,
    else the image-level one); the other arguments override its values.
    """
    overrides = dict(iters=iters, batch_size=batch_size, micro_batch=micro_batch, lr=lr, val_pairs=val_pairs,
                     validate_every=validate_every, checkpoint_every=checkpoint_every, precision=precision, seed=seed)
    data, ids, skipped, _, _, info, reals, cfg = plan_finetune(pairs, restorer, real, config, overrides, exclude,
                                                               include_failed)
    dev = resolve_device(device)
    get_run_logger().info("finetune: %d pairs (%d error rows skipped), %s real faces, %s, %s", len(ids), skipped,
                          "no" if reals is None else len(reals), info["arch"], type(cfg).__name__)
    real_items = list_inputs(real, exclude)[0] if reals is not None else []
    key = stable_hash([STAGE, type(cfg).__name__, asdict(cfg), manifest.read_index(pairs)["key"],
                       [(i.uri, i.version) for i in real_items], info.get("sha256") or info.get("name"),
                       include_failed], length=12)
    where = storage.join(storage.normalize(out), STAGE, key)
    result = finetune_task.with_options(result_storage=result_storage(where))(
        key=stable_hash([where, CODE_VERSION]), pairs=pairs, restorer=restorer, real=real, config=config,
        overrides=overrides, out=where, device=str(dev), exclude=list(exclude), include_failed=include_failed)
    index_config = {"finetune": asdict(cfg), "recipe": type(cfg).__name__, "pairs": pairs, "real": real,
                    "skipped_pairs": skipped, "include_failed": include_failed, **{k: v for k, v in result.items() if k != "shard"}}
    ManifestWriter(where).write_index(STAGE, key, index_config, [ShardInfo(**result["shard"])])
    return where
