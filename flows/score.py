"""The score stage: metric columns on a new manifest, FID for the set, conventions recorded."""

from __future__ import annotations

import json
import os

from prefect import flow, get_run_logger

from bfr_models import manifest, models, storage
from bfr_models.choices import DEFAULT_METRICS, NO_REFERENCE_DEFAULT
from bfr_models.metrics.niqe import niqe_convention as niqe_convention_name
from bfr_models.metrics.suite import FULL_REFERENCE, ScoreConfig, conventions, model_cards_needed, parse_metrics
from flows.run_info import run_name
from flows.stage import run_stage, skipped_record
from tasks.rows import content_id
from tasks.runtime import host_gpu_slot, local_device
from tasks.score import STAGE, score_shard
from tasks.shards import InputItem, list_inputs


def input_rows(uri: str, exclude: tuple[str, ...] | list[str] = ()) -> tuple[list[dict], int]:
    """Rows to score: a manifest's rows (errors included, they pass through) or a folder's files (a file
    that is not an image becomes an error row); and how many files were skipped (dotfiles, ``exclude``)."""
    if manifest.is_manifest(uri):
        return manifest.read_table(uri).to_pylist(), 0
    items, skipped = list_inputs(uri, exclude)
    # image_id here is provisional and sha256 unknown: the score task fills both in from the bytes it reads
    return [{"image_id": content_id(i.uri.encode(), i.name), "uri": i.uri, "sha256": None, "version": i.version,
             "name": i.name, "duplicate_of": i.duplicate_of, "source_name": i.source_name,
             "stage": "input", "status": "ok"} for i in items], skipped




def default_metrics(input: str, reference: str | None) -> tuple[str, str | None]:
    """The metrics ``score`` computes when none are named, and a line saying so when the images have no
    reference (a folder, or a manifest without parents), so full-reference metrics cannot apply."""
    if reference is not None:
        return DEFAULT_METRICS, None
    if manifest.is_manifest(input):
        parents = manifest.read_table(input).column("parent_uri").to_pylist()
        if any(parents):
            return DEFAULT_METRICS, None
    cards = model_cards_needed(ScoreConfig(NO_REFERENCE_DEFAULT))
    chosen, missing = [], []
    for metric in NO_REFERENCE_DEFAULT:
        try:
            if metric in cards:
                models.model_path(cards[metric])
            chosen.append(metric)
        except models.ModelMissingError:
            missing.append(f"{metric} (`bfr-curate models pull {cards[metric]}`)")
    note = (f"score: {input} has no reference images (pass --reference for {','.join(FULL_REFERENCE)}): "
            f"no-reference metrics {','.join(chosen)}" + (f"; without {', '.join(missing)}" if missing else ""))
    return ",".join(chosen), note


def _reference_lookup(reference: str | None):
    """row -> the URI of its reference image: a manifest (by parent_id), a folder (by file name), or the parent."""
    if reference is None:
        return lambda row: row.get("parent_uri")
    lineage = Lineage()
    if manifest.is_manifest(reference):
        table = manifest.read_table(reference).to_pylist()
        by_id = {r["image_id"]: r["uri"] for r in table if r["status"] == "ok"}
        return lambda row: next((by_id[i] for r in lineage.chain(row) for i in (r.get("parent_id"), r.get("image_id"))
                                 if i in by_id), None)
    by_name = {os.path.basename(f.uri): f.uri for f in storage.list_images(reference)}
    return lambda row: next((by_name[n] for r in lineage.chain(row)
                             for n in (os.path.basename(r.get("parent_uri") or r.get("uri") or ""),) if n in by_name), None)


class Lineage:
    """Walks a row's ancestors through the manifests their images live in (``<stage>/<key>/images/``).

    A pseudo target's parent is a degraded image whose parent is the clean face: scoring the target
    against the faces' manifest finds its reference two generations up.
    """

    MAX_DEPTH = 8

    def __init__(self):
        self._rows: dict[str, dict[str, dict]] = {}  # stage folder -> its rows by image_id

    def _stage_rows(self, image_uri: str) -> dict[str, dict]:
        folder = image_uri.rsplit("/images/", 1)[0] if "/images/" in image_uri else None
        if folder is None:
            return {}
        if folder not in self._rows:
            self._rows[folder] = ({r["image_id"]: r for r in manifest.read_table(folder).to_pylist()}
                                  if manifest.is_manifest(folder) else {})
        return self._rows[folder]

    def chain(self, row: dict):
        """The row, then its parent's row, and so on, as far as the manifests reach."""
        current = row
        for _ in range(self.MAX_DEPTH):
            yield current
            current = self._stage_rows(current.get("parent_uri") or "").get(current.get("parent_id"))
            if current is None:
                return


def plan_score(input: str, metrics: str | list[str], reference: str | None, fid_ref: str | None,
               niqe_convention: str, crop_border: int, y_channel: bool, lpips_net: str, fid_convention: str,
               skip_missing: bool, fid_allow_small: bool = False, exclude: tuple[str, ...] | list[str] = (),
               rows: list[dict] | None = None):
    """Validate everything before any work; returns (config, items, skip list, not-computed records).

    ``rows``: the input's rows when the caller has listed them already (:func:`input_rows`)."""
    config = ScoreConfig(parse_metrics(metrics), niqe_convention_name(niqe_convention), crop_border, y_channel,
                         lpips_net, fid_convention)
    not_computed = []
    for metric, card in model_cards_needed(config).items():
        try:
            models.model_path(card)
        except models.ModelMissingError as e:
            if not skip_missing:
                raise
            not_computed.append(models.missing_record(metric, card, e))
    skip = [r["metric"] for r in not_computed]
    rows = input_rows(input, exclude)[0] if rows is None else rows
    lookup = _reference_lookup(reference)
    full_ref = [m for m in config.metrics if m in FULL_REFERENCE and m not in skip]
    items, ok = [], []
    for row in rows:
        ref = lookup(row) if full_ref and row["status"] == "ok" else None
        version = row.pop("version", None) or row.get("sha256") or "-"
        name = row.pop("name", None)
        item = InputItem(uri=row.get("uri") or f"error:{row['image_id']}", version=version,
                         parent_id=row["image_id"], split=row.get("split"), row=json.dumps(row, default=str),
                         reference=ref, name=name)
        items.append(item)
        if row["status"] == "ok":
            ok.append(item)
    if full_ref and ok and not any(i.reference for i in ok):
        raise ValueError(f"metric {','.join(full_ref)} needs a reference: pass --reference <manifest or folder>, "
                         f"score a manifest whose rows have parents, or choose no-reference metrics "
                         f"(--metrics {','.join(NO_REFERENCE_DEFAULT)})")
    if full_ref:
        _check_first_pair_sizes(ok)
    if "fid" in config.metrics and "fid" not in skip:
        if fid_ref is None:
            raise ValueError("metric fid needs --fid-ref <stats .npz, manifest or folder>")
        from bfr_models.metrics.fid import plan_reference

        plan_reference(fid_ref, fid_convention, allow_small=fid_allow_small)
    return config, items, skip, not_computed


def _check_first_pair_sizes(items: list[InputItem]) -> None:
    """Mismatched sizes are a setup error (wrong reference), so check one pair before any work."""
    import io

    from PIL import Image

    first = next((i for i in items if i.reference), None)
    if first is None:
        return
    sizes = []
    for uri in (first.uri, first.reference):
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
            sizes.append(im.size)
    if sizes[0] != sizes[1]:
        raise ValueError(f"image sizes differ from the reference: {first.uri} is {sizes[0][0]}x{sizes[0][1]}, "
                         f"{first.reference} is {sizes[1][0]}x{sizes[1][1]} (score LR images against an LR "
                         "reference, or degrade with resize back)")


@flow(name="score", flow_run_name=run_name)
def score_flow(input: str, out: str, metrics: str = "niqe,psnr,ssim", reference: str | None = None,
               fid_ref: str | None = None, niqe_convention: str = "pyiqa", crop_border: int = 0,
               y_channel: bool = False, lpips_net: str = "vgg", fid_convention: str = "clean",
               skip_missing: bool = False, fid_allow_small: bool = False, shard_size: int = 256,
               batch_size: int = 8, device: str = "auto", exclude: tuple[str, ...] | list[str] = ()) -> str:
    """Score every row of `input`; returns the scored manifest URI (the input is never modified)."""
    rows, skipped = input_rows(input, exclude)
    config, items, skip, not_computed = plan_score(input, metrics, reference, fid_ref, niqe_convention, crop_border,
                                                   y_channel, lpips_net, fid_convention, skip_missing,
                                                   fid_allow_small, rows=rows)
    dev = local_device(device)  # the set-level FID runs here; shards resolve `device` where they run
    logger = get_run_logger()
    for r in not_computed:
        logger.warning("%s not computed: needs %s (%s)", r["metric"], r["needs"], r["command"])
    fid_cache = storage.join(storage.normalize(out), "fid-cache")  # reference statistics, by content
    stage_config = {**config.as_dict(), "reference": reference, "fid_ref": fid_ref, "skip": skip}

    def set_level(stage_uri: str, shards) -> dict:
        """What the index records beside the rows: FID of the whole set, conventions, what was not computed."""
        set_metrics = {}
        if "fid" in config.metrics and "fid" not in skip:
            set_metrics = _fid(stage_uri, shards, config, fid_ref, fid_allow_small, fid_cache, dev)
        return {"conventions": conventions(config), "not_computed": not_computed, "set_metrics": set_metrics,
                "source": input, **skipped_record(input, skipped, exclude)}

    with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
        return run_stage(score_shard, STAGE, stage_config, items, input, out, shard_size, finalize=set_level,
                         score_config=config.as_dict(), skip=skip, device=device, batch_size=batch_size)


def _fid(stage_uri: str, shards, config: ScoreConfig, fid_ref: str, allow_small: bool, fid_cache: str, dev) -> dict:
    """FID of the scored set against the reference, from the feature file each shard wrote (each read once)."""
    from bfr_models.metrics.fid import (FeatureSums, FIDStats, ImageRef, extract_features, fid_from_stats,
                                        plan_reference, read_shard_features, reference_stats, shard_features_uri,
                                        write_shard_features)
    from tasks.score import extractor

    inception = extractor(config.fid_convention, str(dev))
    sums = FeatureSums()
    for shard in shards:
        uri = shard_features_uri(stage_uri, shard.name)
        try:
            sums.add(read_shard_features(uri, inception.fingerprint))
        except FileNotFoundError:  # removed since the shard ran: extract it again from the shard's images
            ok = [r for r in manifest.read_table(storage.join(stage_uri, shard.path)).to_pylist() if r["status"] == "ok"]
            feats = extract_features([ImageRef(r["uri"], r["sha256"]) for r in ok], inception)
            write_shard_features(uri, inception.fingerprint, feats.keys, feats.feats)
            sums.add(feats.feats)
    mu, sigma = sums.stats()
    stats = FIDStats(mu, sigma, sums.n, config.fid_convention, stage_uri, inception.network)
    ref = reference_stats(plan_reference(fid_ref, config.fid_convention, allow_small=allow_small), inception,
                          cache_root=fid_cache, allow_small=allow_small)
    return fid_from_stats(stats, ref).as_record()
