"""IDM as stages: ``idm train`` (one intrinsic round) and ``clean`` (extrinsic rounds with acceptance).

``clean`` round r cleans the HQ images with model r (x* = f_r(x), Eq. 10) and judges every x* (see
:mod:`bfr_models.idm.acceptance`, thresholds in ``catalogs/acceptance/idm.yaml``); between rounds, model
r+1 is trained from model r's weights on (degrade(x), x*) -- x the original, as the paper does (spec
§3.3); ``degrade_source="cleaned"`` draws the degradation from x* instead. Every round's manifest is
kept; the last is the cleaned dataset. The clean stage is incremental: images added to the input later
are the only ones the next run processes.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
from prefect import flow, get_run_logger, task

from bfr_models import manifest, models, storage
from bfr_models.device import check_compile, default_batch_size, resolve_dtype
from bfr_models.choices import IDM_DEGRADE_SOURCES as DEGRADE_SOURCES
from bfr_models.choices import IDM_VARIANCES as VARIANCES
from bfr_models.idm import (AcceptanceConfig, IDMConfig, IDMError, IDMTrainConfig, SetCalibration, load_acceptance,
                            load_idm, train_idm)
from bfr_models.training.data import UriImages
from flows.prior import progress, training_bar, training_images
from flows.check_summary import count_checks
from flows.run_info import publish_model_summary, run_name
from flows.stage import run_stage, run_training, skipped_record, subflow_runner
from tasks.clean import STAGE, cached_idm, clean_shard, set_calibration
from tasks.rows import made_where
from tasks.runtime import host_gpu_slot, key_parameter, local_device, resolve_device, result_storage
from tasks.shards import CODE_VERSION, list_inputs, stable_hash

DEFAULT_CHANNELS = IDMConfig().channels


def _pairs(targets: str, resolution: int, degrade_source: str) -> tuple[UriImages, UriImages]:
    """(sources, targets) from a clean manifest, read when a batch needs them: the original x (or, with
    ``degrade_source="cleaned"``, the cleaned image) and the cleaned dataset's image x*."""
    frame = manifest.read_manifest(targets)
    ok = frame[frame["status"] == "ok"].sort_values("source_uri")
    cleaned = UriImages([str(u) for u in ok["uri"]], resolution)
    return (cleaned if degrade_source == "cleaned" else UriImages([str(u) for u in ok["source_uri"]], resolution),
            cleaned)


@task(name="idm-train", cache_key_fn=key_parameter, persist_result=True,
      result_serializer="json")  # a checkable record, never a pickle (tasks.runtime.key_parameter)
def idm_train_task(key: str, input: str, targets: str | None, model: dict, train: dict, resolution: int,
                   degrade_source: str, init: str | None, round: int, out: str, device: str,
                   exclude: list[str], loader_workers: int | None = None) -> str:
    cfg, tcfg = IDMConfig(**model), IDMTrainConfig(**train)
    dev = resolve_device(device)  # here: on Dask, the worker's device
    if targets:
        sources, target_images = _pairs(targets, resolution, degrade_source)
    else:
        sources, target_images = training_images(input, resolution, exclude), None
    init_model = load_idm(init, dev) if init else None
    source = {"round": round, "resolution": resolution, "input": input, "targets": targets,
              "degrade_source": degrade_source, "images": len(sources), **made_where(dev)}
    with training_bar(tcfg.iters, f"idm train (round {round})", "it") as bar:
        return train_idm(sources, cfg, tcfg, out, targets=target_images, init=init_model, device=dev,
                         source=source, on_step=progress(bar, tcfg.iters, key), workers=loader_workers)


def plan_idm_train(input: str, resolution: int, crop: int | None, channels, layers_per_block: int, attention,
                   norm_groups: int, train: dict, exclude: tuple[str, ...] | list[str] = ()
                   ) -> tuple[IDMConfig, IDMTrainConfig, list]:
    """Validate before any work: the architecture, the training knobs and that there are images."""
    model = IDMConfig(crop=crop or resolution, channels=tuple(channels), layers_per_block=layers_per_block,
                      attention=tuple(attention), norm_groups=norm_groups)
    if model.crop > resolution:
        raise IDMError(f"idm train: crop {model.crop} is larger than the resolution {resolution}")
    tcfg = IDMTrainConfig(**train)
    if not storage.exists(input):
        raise FileNotFoundError(f"input not found: {input}")
    items, _ = list_inputs(input, exclude)
    if not items:
        raise IDMError(f"idm train: no images in {input}")
    return model, tcfg, items


@flow(name="idm-train", flow_run_name=run_name)
def idm_train_flow(input: str, out: str, resolution: int = 512, crop: int | None = None,
                   channels: tuple[int, ...] = DEFAULT_CHANNELS, layers_per_block: int = 2,
                   attention: tuple[int, ...] = (32, 16), norm_groups: int = 32, iters: int = 100_000,
                   batch_size: int = 32, lr: float = 1e-4, warmup: int = 10_000, ema_decay: float = 0.9999,
                   loss_p: int = 1, preset: str = "idm", checkpoint_every: int = 5000, seed: int = 0,
                   targets: str | None = None, init: str | None = None, degrade_source: str = "original",
                   round: int = 1, device: str = "auto", exclude: tuple[str, ...] | list[str] = (),
                   loader_workers: int | None = None) -> str:
    """Train the conditional IDM restorer on the images of `input` (round 1) or on a clean manifest's pairs
    (`targets`, later rounds, initialised from `init`); returns the model folder's URI. Images are read,
    cropped and degraded by `loader_workers` DataLoader processes (None: from the cores)."""
    train = dict(iters=iters, batch_size=batch_size, lr=lr, warmup=warmup, ema_decay=ema_decay, loss_p=loss_p,
                 preset=preset, checkpoint_every=checkpoint_every, seed=seed)
    model, tcfg, items = plan_idm_train(input, resolution, crop, channels, layers_per_block, attention,
                                        norm_groups, train, exclude)
    local_device(device)  # a device this machine lacks fails here, before any work (on Dask: on the worker)
    init_sha = load_idm(init).sha256 if init else None
    target_version = manifest.read_index(targets)["key"] if targets else None
    key = stable_hash(["idm", asdict(model), asdict(tcfg), resolution, [(i.uri, i.version) for i in items],
                       target_version, init_sha, degrade_source, round], length=12)
    where = storage.join(storage.normalize(out), "idm", key)
    get_run_logger().info("idm train round %d: %d images -> %s", round, len(items), where)
    uri = run_training(idm_train_task.with_options(result_storage=result_storage(where)),
                       desc=f"idm train (round {round})", total=tcfg.iters, unit="it",
                       key=stable_hash([where, CODE_VERSION]), input=input, targets=targets, model=asdict(model),
                       train=asdict(tcfg), resolution=resolution, degrade_source=degrade_source, init=init,
                       round=round, out=where, device=device, exclude=list(exclude), loader_workers=loader_workers)
    publish_model_summary("idm", uri, {"input": input, "images": len(items), "round": round,
                                             "resolution": resolution, **asdict(tcfg)})
    return uri


def _optional_scorer(card: str, wanted: bool | None, not_computed: list, metric: str) -> bool:
    """Use a scorer when its weights are cached (``wanted=None``: if present; True: required)."""
    if wanted is False:
        return False
    try:
        models.model_path(card)
        return True
    except models.ModelMissingError as e:
        if wanted:
            raise
        not_computed.append(models.missing_record(metric, card, e))
        return False


def clean_scorers(musiq: bool | None, lpips: bool | None, identity: bool | None, fid: bool | None,
                  not_computed: list) -> tuple[bool, bool, bool, bool]:
    """Which of clean's optional scorers run (MUSIQ, LPIPS, FaceNet identity, FID): see :func:`_optional_scorer`."""
    return (_optional_scorer("musiq_koniq", musiq, not_computed, "musiq"),
            _optional_scorer("lpips_vgg16_backbone", lpips, not_computed, "lpips"),
            _optional_scorer("facenet_vggface2", identity, not_computed, "identity_cos"),
            _optional_scorer("fid_inception_clean", fid, not_computed, "fid"))


def plan_clean(input: str, model: str, rounds: int, steps: int, variance: str, passes: int, degrade_source: str,
               dtype: str | None, device: str = "auto", compile: bool = False):
    if rounds < 1:
        raise IDMError(f"clean: --rounds must be >= 1, got {rounds}")
    if passes < 1:
        raise IDMError(f"clean: --passes must be >= 1, got {passes}")
    if steps < 1:
        raise IDMError(f"clean: --steps must be >= 1, got {steps}")
    if variance not in VARIANCES:
        raise IDMError(f"clean: --variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    if degrade_source not in DEGRADE_SOURCES:
        raise IDMError(f"clean: degrade_source must be one of {', '.join(DEGRADE_SOURCES)}")
    dev = local_device(device)
    resolve_dtype(dtype, dev)
    check_compile(compile, dev)
    if not storage.exists(input):
        raise FileNotFoundError(f"input not found: {input}")
    return cached_idm(storage.normalize(model), str(dev))  # missing / corrupt model: one line, before any work


@flow(name="clean", flow_run_name=run_name)
def clean_flow(input: str, out: str, model: str, rounds: int = 1, steps: int = 10, variance: str = "posterior",
               passes: int = 1, degrade_source: str = "original", round_iters: int = 50_000,
               round_batch_size: int = 32, round_lr: float = 1e-4, round_warmup: int = 1000,
               round_checkpoint_every: int = 5000, acceptance: str | None = None, min_lowpass_psnr: float | None = None,
               lowpass_N: int | None = None, max_lpips: float | None = None, min_identity: float | None = None,
               max_chroma_shift: float | None = None,
               musiq: bool | None = None, lpips: bool | None = None, identity: bool | None = None,
               fid: bool | None = None, seed: int = 0,
               shard_size: int = 64, batch_size: int | None = None, device: str = "auto", dtype: str | None = None,
               exclude: tuple[str, ...] | list[str] = (), compile: bool = False) -> str:
    """Clean the images of `input` with an IDM model for `rounds` extrinsic rounds; returns the last manifest.

    `acceptance`: a thresholds YAML (default catalogs/acceptance/idm.yaml); the other acceptance
    arguments override single values of it when given. ``dtype`` None: bf16 on CUDA, else fp32;
    ``batch_size`` None: from free device memory on CUDA, else 8 (:mod:`bfr_models.device`)."""
    accept = load_acceptance(acceptance, min_lowpass_psnr=min_lowpass_psnr, lowpass_N=lowpass_N, max_lpips=max_lpips,
                             min_identity=min_identity, max_chroma_shift=max_chroma_shift)
    first = plan_clean(input, model, rounds, steps, variance, passes, degrade_source, dtype, device, compile)
    dev = local_device(device)  # calibration and FID run here; shards resolve `device` where they run
    dtype = resolve_dtype(dtype, dev)
    not_computed: list[dict] = []
    use_musiq, use_lpips, use_identity, use_fid = clean_scorers(musiq, lpips, identity, fid, not_computed)
    items, skipped = list_inputs(input, exclude)
    logger = get_run_logger()
    logger.info("clean: %d inputs (%d skipped), %d round(s)", len(items), skipped, rounds)
    model_uri, history, uri = storage.normalize(model), [], None
    resolution = first.resolution
    batch_size = batch_size or default_batch_size(dev, resolution, dtype, cpu_default=8)
    with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
        calibration = _frozen_calibration(input, out, items, accept, use_musiq, use_identity, str(dev), batch_size)
        logger.info("clean: %s", calibration)
        for r in range(1, rounds + 1):
            if r > 1:  # f_{r} initialised from f_{r-1}, trained on (degrade(x), x*) of the last round
                model_uri = idm_train_flow.with_options(task_runner=subflow_runner())(  # on Dask: on a worker
                    input=input, out=out, resolution=resolution, crop=first.config.crop,
                    channels=first.config.channels, layers_per_block=first.config.layers_per_block,
                    attention=first.config.attention, norm_groups=first.config.norm_groups, iters=round_iters,
                    batch_size=round_batch_size, lr=round_lr, warmup=round_warmup,
                    checkpoint_every=round_checkpoint_every, seed=seed, targets=uri, init=model_uri,
                    degrade_source=degrade_source, round=r, device=device)
            m = cached_idm(model_uri, str(dev))
            config = {"model": m.sha256, "model_uri": model_uri, "round": r, "steps": steps, "variance": variance,
                      "passes": passes, "acceptance": asdict(accept), "calibration": asdict(calibration),
                      "musiq": use_musiq, "lpips": use_lpips, "identity": use_identity, "seed": seed, "dtype": dtype,
                      **({"compile": True} if compile else {})}
            last = r == rounds

            def set_level(stage_uri: str, shards, r=r, model_uri=model_uri, last=last) -> dict:
                """The index's record of this round and the rounds before it (the last round's index is the
                cleaned dataset's: it also holds the FID of cleaned vs original)."""
                history.append(round_record(stage_uri, shards, r, model_uri))
                set_metrics = _fid_cleaned_vs_original(stage_uri, shards, dev) if use_fid and last else {}
                return {"rounds": list(history), "not_computed": not_computed, "set_metrics": set_metrics,
                        "source": input, **skipped_record(input, skipped, exclude)}

            uri = run_stage(clean_shard, STAGE, config, items, input, out, shard_size, incremental=True,
                            finalize=set_level, model_uri=model_uri, round=r, steps=steps, variance=variance,
                            passes=passes, acceptance=asdict(accept), calibration=asdict(calibration), musiq=use_musiq,
                            lpips=use_lpips, identity=use_identity, fid=use_fid and last, seed=seed, device=device,
                            dtype=dtype, batch_size=batch_size, compile=compile)
            logger.info("clean round %d: %d of %d images replaced", r, history[-1]["replaced"], history[-1]["images"])
    return uri


def round_record(stage_uri: str, shards, r: int, model_uri: str) -> dict:
    """One clean round in numbers, from its shards: images, replaced, errors, rows each check rejected, rows
    resized to the model's resolution."""
    frame = pd.concat([manifest.read_manifest(storage.join(stage_uri, s.path)) for s in shards], ignore_index=True)
    ok = frame[frame["status"] == "ok"] if len(frame) else frame
    column = ok.get("rejected_by", pd.Series(dtype=object)).dropna()
    return {"round": r, "model": model_uri, "manifest": stage_uri, "images": int(len(ok)),
            "replaced": int(ok["replaced"].sum()) if len(ok) else 0, "errors": int(len(frame) - len(ok)),
            "rejected_by": count_checks(text.split(",") for text in column),
            "resized": int(ok["resized"].sum()) if "resized" in ok else 0,
            "model_px": int(ok["model_px"].iloc[0]) if len(ok) and "model_px" in ok else None}


def _frozen_calibration(input: str, out: str, items: list, accept: AcceptanceConfig, musiq: bool, identity: bool,
                        device: str, batch_size: int) -> SetCalibration:
    """The set-level calibration (A4's degraded cut, A1's threshold) of this input and these rules, computed
    from the images of the first run and then kept: images added later are judged against the same cut, so
    the verdicts already written stay valid (the rank is that of the set first seen). It is part of the
    stage's config, so a different calibration is a different stage folder."""
    key = stable_hash(["clean-calibration", storage.normalize(input), asdict(accept), musiq, identity, CODE_VERSION],
                      length=12)
    uri = storage.join(storage.normalize(out), STAGE, f"calibration-{key}.json")
    if storage.exists(uri):
        return SetCalibration(**json.loads(storage.read_bytes(uri)))
    calibration = set_calibration(items, accept, musiq, identity, device, batch_size)
    storage.write_bytes_atomic(uri, json.dumps(asdict(calibration)).encode())
    return calibration


def _fid_cleaned_vs_original(stage_uri: str, shards, dev) -> dict:
    """FID between the cleaned dataset and the originals (same images before cleaning), clean-fid convention,
    from the feature files each shard wrote (a missing one, e.g. of a shard kept from a run without FID, is
    extracted again from the shard's images)."""
    from bfr_models.metrics.fid import (FeatureSums, FIDStats, ImageRef, extract_features, fid_from_stats,
                                        read_shard_features, write_shard_features)
    from tasks.clean import FID_CONVENTION, fid_features_uri
    from tasks.score import extractor

    inception = extractor(FID_CONVENTION, str(dev))
    sums = {"cleaned": FeatureSums(), "original": FeatureSums()}
    for shard in shards:
        rows = None
        for name, (uri_column, sha_column) in (("cleaned", ("uri", "sha256")),
                                               ("original", ("source_uri", "source_sha256"))):
            where = fid_features_uri(stage_uri, shard.name, name)
            try:
                sums[name].add(read_shard_features(where, inception.fingerprint))
            except FileNotFoundError:
                if rows is None:
                    rows = [r for r in manifest.read_table(storage.join(stage_uri, shard.path)).to_pylist()
                            if r["status"] == "ok"]
                feats = extract_features([ImageRef(r[uri_column], r[sha_column]) for r in rows], inception)
                write_shard_features(where, inception.fingerprint, feats.keys, feats.feats)
                sums[name].add(feats.feats)
    stats = {}
    for name, part in sums.items():
        mu, sigma = part.stats()
        stats[name] = FIDStats(mu, sigma, part.n, FID_CONVENTION, f"{stage_uri} ({name})", inception.network)
    return {"fid_cleaned_vs_original": fid_from_stats(stats["cleaned"], stats["original"]).as_record()}
