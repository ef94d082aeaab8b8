"""The pseudo-targets stage: a diffusion prior turns LQ faces into clean targets (DR2, Algorithm 1, polish).

Everything that can be checked is checked before any work (method parameters against the prior's
resolution, the prior's weights and hash, the restorer, sizes under ``resize=refuse``). With
``auto`` the stage first searches a grid of parameters on a sample of the input (a cached task),
and records the grid and the choice in the index and in every row.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import numpy as np
import torch
from prefect import flow, get_run_logger, task

from bfr_models import manifest, models, storage
from bfr_models.choices import AUTO_METRICS
from bfr_models.device import check_compile, default_batch_size, resolve_dtype
from bfr_models.gate import GateConfig, load_gate
from bfr_models.pseudo_targets import (RESIZE_MODES, Candidate, MethodParams, PseudoTargetError, choose, grid,
                                       lowfreq_psnr, method_params, to_resolution, validate,
                                       with_resolution)
from flows.check_summary import checks_line, count_checks
from flows.run_info import run_name
from flows.stage import run_stage, skipped_record
from tasks.rows import decode_items, same_size_batches
from tasks.runtime import host_gpu_slot, key_parameter, local_device
from tasks.pseudo_targets import (STAGE, cached_prior, cached_restorer, gate_batch, niqe_defined,
                                  pseudo_target_shard, run_generate, sample_seeds)
from tasks.shards import CODE_VERSION, InputItem, list_inputs, read_many, stable_hash



def parse_grid(text: str | None) -> dict[str, list[int]] | None:
    """``"N=4,8,16;tau=100,200"`` -> ``{"N": [4, 8, 16], "tau": [100, 200]}``."""
    if not text:
        return None
    out = {}
    for part in text.split(";"):
        name, _, values = part.partition("=")
        try:
            out[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise PseudoTargetError(f"--auto-grid: {part!r} is not NAME=INT,INT,...") from None
        if not out[name.strip()]:
            raise PseudoTargetError(f"--auto-grid: {part!r} lists no values")
    return out


def plan_pseudo_targets(input: str, prior: str, method: str, params: dict, restorer: str | None, resize: str,
                        best_of: int, dtype: str, device: str, auto: bool, auto_grid: str | None,
                        auto_metric: str, exclude: tuple[str, ...] | list[str] = (), gate: str | None = None,
                        compile: bool = False):
    """Validate everything before any work. Returns (method params, prior, restorer, items, skipped)."""
    p = method_params(method, **params)
    try:
        load_gate(gate)
    except ValueError as e:
        raise PseudoTargetError(str(e)) from None
    if resize not in RESIZE_MODES:
        raise PseudoTargetError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if best_of < 1:
        raise PseudoTargetError(f"--best-of must be >= 1, got {best_of}")
    dev = str(local_device(device))
    resolve_dtype(dtype, torch.device(dev))
    check_compile(compile, torch.device(dev))
    if restorer and method in ("dr2", "difbfsr"):
        raise PseudoTargetError(f"--restorer applies to lowfreq and polish; {method} works on the LQ input itself")
    if not storage.exists(input):
        raise PseudoTargetError(f"input not found: {input}")
    loaded = cached_prior(prior, dev)  # missing prior, bad hash, unknown format: one line, before work
    p = with_resolution(p, loaded.resolution)
    validate(p, loaded.resolution)
    restore = cached_restorer(restorer, dev) if restorer else None
    if auto:
        if auto_metric not in AUTO_METRICS:
            raise PseudoTargetError(f"--auto-metric must be one of {', '.join(AUTO_METRICS)}")
        if auto_metric == "musiq":
            models.model_path("musiq_koniq")  # ModelMissingError names the file and the pull command
        for cand in grid(method, p, parse_grid(auto_grid)):
            validate(cand, loaded.resolution)
    items, skipped = list_inputs(input, exclude)
    if resize == "refuse" and manifest.is_manifest(input):
        frame = manifest.read_manifest(input)
        ok = frame[frame["status"] == "ok"]
        up = p.upscale
        want = loaded.resolution // up
        wrong = ok[(ok["width"] != want) | (ok["height"] != want)]
        if len(wrong):
            r = wrong.iloc[0]
            times = f" times scale {up}" if up > 1 else ""
            raise PseudoTargetError(f"{len(wrong)} images{times} differ from the prior's resolution {loaded.resolution} "
                                    f"(first: {r['uri']} is {r['width']}x{r['height']}); use --resize input to resize")
    if auto and items and auto_metric == "niqe":
        size = _output_size(input, loaded.resolution, resize, p.upscale)
        if size is not None and not niqe_defined(*size):
            raise PseudoTargetError(f"--auto scores with NIQE, which needs outputs of at least two 96-px blocks; "
                                    f"outputs here are {size[1]}x{size[0]} (use larger inputs with --resize input, "
                                    f"or --auto-metric musiq)")
    return p, loaded, restore, items, skipped


def _output_size(input: str, resolution: int, resize: str, up: int) -> tuple[int, int] | None:
    if resize != "input":
        return resolution, resolution
    if not manifest.is_manifest(input):
        return None
    frame = manifest.read_manifest(input)
    ok = frame[frame["status"] == "ok"]
    return (int(ok["height"].min()) * up, int(ok["width"].min()) * up) if len(ok) else None


@task(name="pseudo-targets-auto", cache_key_fn=key_parameter, persist_result=True,
      result_serializer="json")  # a checkable record, never a pickle (tasks.runtime.key_parameter)
def auto_search(key: str, sample_uris: list[str], sample_ids: list[str], candidates: list[dict], prior_uri: str,
                restorer: str | None, resize: str, fidelity_limit: float, fidelity_N: int, metric: str, seed: int,
                device: str, dtype: str, batch_size: int, gate: dict, gate_musiq: bool, gate_identity: bool) -> dict:
    """Run every candidate on the sample; score quality (NIQE/MUSIQ), low-frequency fidelity and the gate."""
    dev = local_device(device)
    prior = cached_prior(prior_uri, str(dev))
    restore = cached_restorer(restorer, str(dev)) if restorer else None
    decoded, _ = decode_items(STAGE, [InputItem(u, "-", parent_id=i) for u, i in zip(sample_uris, sample_ids)], read_many(sample_uris))
    quality = _quality_fn(metric, dev)
    gate_config = GateConfig(**gate)
    results = []
    for cand in candidates:
        p = MethodParams(**cand)
        q, f, nz, passed = [], [], [], []
        for batch in same_size_batches(decoded, batch_size):
            images = torch.from_numpy(np.stack([rgb for _, _, rgb, _ in batch])).permute(0, 3, 1, 2).float() / 255.0
            seeds = [sample_seeds(seed, pid, 1) for _, pid, _, _ in batch]
            out = run_generate(p, images, prior, seeds, restore, resize, fidelity_limit, dtype)
            q += quality(out.images).tolist()
            R = prior.resolution
            f += lowfreq_psnr(to_resolution(out.images, R), to_resolution(images, R), fidelity_N).tolist()
            nz += [r["noise_sigma"] for r in out.records]
            passed += [r["gate"] == "pass" for r in gate_batch(p, images, out, R, gate_config, gate_musiq,
                                                               gate_identity, str(dev))]
        results.append(Candidate(params=cand, quality=float(np.nanmean(q)), fidelity=float(np.mean(f)),
                                 noise=float(np.mean(nz)), pass_rate=float(np.mean(passed))))
    best, reason = choose(results, fidelity_limit, higher_is_better=metric == "musiq",
                          min_pass_rate=gate_config.auto_min_pass_rate, tolerance=gate_config.auto_tolerance(metric))
    return {
        "metric": metric, "fidelity": f"low-frequency PSNR of Phi_{fidelity_N} at {prior.resolution} px vs the input",
        "fidelity_limit": fidelity_limit, "sample_ids": sample_ids, "chosen": best, "reason": reason,
        "min_pass_rate": gate_config.auto_min_pass_rate, "tolerance": gate_config.auto_tolerance(metric),
        "grid": [{**c.params, metric: c.quality, "lf_psnr": c.fidelity, "noise_sigma": c.noise,
                  "gate_pass_rate": c.pass_rate} for c in results],
    }


def _quality_fn(metric: str, dev):
    if metric == "musiq":
        from tasks.clean import cached_scorer

        scorer = cached_scorer("musiq", str(dev))  # the gate's, when it scores MUSIQ too
        return lambda x: torch.as_tensor(scorer(x.to(dev))).double().cpu()
    from bfr_models.metrics.niqe import niqe

    return lambda x: niqe(x.to(dev)).double().cpu()


def _sample(items, n: int, seed: int):
    """A deterministic sample of the inputs: the n items with the smallest seeded hash."""
    ranked = sorted(items, key=lambda i: hashlib.sha256(f"{seed}:{i.parent_id or i.uri}".encode()).hexdigest())
    return sorted(ranked[:n], key=lambda i: i.uri)


@flow(name="pseudo-targets", flow_run_name=run_name)
def pseudo_targets_flow(input: str, out: str, prior: str, method: str = "dr2", N: int | None = None,
                        tau: int | None = None, omega: int | None = None, K: int | None = None,
                        L: int | None = None, n2: int | None = None, scale: int | None = None,
                        t_start: int | None = None, warmup: int | None = None, respace: int | None = None,
                        variance_type: str | None = None, restorer: str | None = None, resize: str = "input",
                        best_of: int = 1, fidelity_limit: float = 20.0, auto: bool = False,
                        auto_grid: str | None = None, auto_metric: str = "niqe", auto_sample: int = 8,
                        seed: int = 0, shard_size: int = 256, batch_size: int | None = None, device: str = "auto",
                        dtype: str | None = None, exclude: tuple[str, ...] | list[str] = (),
                        gate: str | None = None, compile: bool = False) -> str:
    """Pseudo targets for every ok row of `input`, each judged by the quality gate (``gate``: a thresholds YAML,
    default catalogs/gate/pseudo_targets.yaml); returns the manifest URI. ``dtype`` None: bf16 on CUDA, else
    fp32; ``batch_size`` None: from free device memory on CUDA, else 8 (:mod:`bfr_models.device`)."""
    params = {"N": N, "tau": tau, "omega": omega, "K": K, "L": L, "n2": n2, "respace": respace,
              "variance_type": variance_type, "scale": scale, "t_start": t_start, "warmup": warmup}
    p, loaded, restore, items, skipped = plan_pseudo_targets(input, prior, method, params, restorer, resize, best_of,
                                                             dtype, device, auto, auto_grid, auto_metric, exclude,
                                                             gate, compile)
    gate_config, gate_record, gate_scorers = plan_gate(gate, input, loaded.resolution, resize, p.upscale)
    dev = local_device(device)  # the --auto search runs here; shards resolve `device` where they run
    dtype = resolve_dtype(dtype, dev)
    batch_size = batch_size or default_batch_size(dev, loaded.resolution, dtype, cpu_default=8)
    logger = get_run_logger()
    logger.info("pseudo-targets: %d images (%d error rows in the input skipped), %s", len(items), skipped, p.as_dict())
    restorer_info = restore.describe() if restore else None
    with host_gpu_slot(device):  # this host's GPU: one command at a time (nothing on the CPU)
        search = None
        if auto and items:
            cands = grid(method, p, parse_grid(auto_grid))
            chosen_sample = _sample(items, auto_sample, seed)
            fidelity_N = max(c.N or 1 for c in cands) if p.N else 8
            fidelity_N = fidelity_N if loaded.resolution % fidelity_N == 0 else 1
            key = stable_hash(["auto", [c.as_dict() for c in cands], [(i.uri, i.version) for i in chosen_sample],
                               loaded.sha256, restorer_info, resize, fidelity_limit, fidelity_N, auto_metric, seed,
                               dtype, gate_record, CODE_VERSION])
            search = auto_search.with_options(result_storage=_auto_storage(out))(
                key=key, sample_uris=[i.uri for i in chosen_sample],
                sample_ids=[i.parent_id or i.uri for i in chosen_sample],
                candidates=[c.as_dict() for c in cands], prior_uri=prior, restorer=restorer, resize=resize,
                fidelity_limit=fidelity_limit, fidelity_N=fidelity_N, metric=auto_metric, seed=seed, device=str(dev),
                dtype=dtype, batch_size=batch_size, gate=asdict(gate_config), **gate_scorers)
            p = cands[search["chosen"]]
            logger.info("pseudo-targets --auto chose %s (%s)", p.as_dict(), search["reason"])
        config = {"method": p.as_dict(), "prior": loaded.sha256, "prior_uri": loaded.uri, "restorer": restorer_info,
                  "resize": resize, "best_of": best_of, "fidelity_limit": fidelity_limit, "seed": seed, "dtype": dtype,
                  "auto": search, "gate": gate_record, **({"compile": True} if compile else {})}
        row_auto = None if search is None else {"metric": search["metric"], "chosen": p.as_dict(),
                                                "reason": search["reason"], "candidates": len(search["grid"])}
        uri = run_stage(pseudo_target_shard, STAGE, config, items, input, out, shard_size,
                        finalize=lambda *_: skipped_record(input, skipped, exclude), params=asdict(p),
                        prior_uri=prior, restorer=restorer, resize=resize, best_of=best_of,
                        fidelity_limit=fidelity_limit, seed=seed, device=device, dtype=dtype,
                        batch_size=batch_size, auto=row_auto, gate=asdict(gate_config), compile=compile, **gate_scorers)
        logger.info("pseudo-targets: %s", gate_summary(uri))
    return uri


def plan_gate(path: str | None, input: str, resolution: int, resize: str, up: int) -> tuple[GateConfig, dict, dict]:
    """The gate's thresholds, the index record (thresholds, file, checks skipped and why) and which optional
    scorers run: MUSIQ and FaceNet identity when their weights are cached, NIQE where outputs allow it."""
    from flows.idm import _optional_scorer

    config = load_gate(path)  # checked in plan_pseudo_targets
    not_checked: list[dict] = []
    scorers = {"gate_musiq": _optional_scorer("musiq_koniq", None, not_checked, "musiq"),
               "gate_identity": _optional_scorer("facenet_vggface2", None, not_checked, "identity_cos")}
    size = _output_size(input, resolution, resize, up)
    if size is not None and not niqe_defined(*size):
        not_checked.append({"metric": "niqe", "reason": f"outputs of {size[1]}x{size[0]} are under two 96-px blocks"})
    record = {"thresholds": asdict(config), "file": str(path or "catalogs/gate/pseudo_targets.yaml"),
              "not_checked": not_checked}
    return config, record, scorers


def gate_summary(uri: str) -> str:
    """One line: how many targets passed the gate, how many each check failed, the checks not made and why."""
    frame = manifest.read_manifest(uri)
    ok = frame[frame["status"] == "ok"]
    gates = ok["gate"] if "gate" in ok else ok["status"].iloc[:0]  # no ok row: no gate column
    passed = int((gates == "pass").sum())
    reasons = ok.loc[gates == "fail", "gate_reason"].dropna() if len(gates) else []
    checks = count_checks([part.split(":")[0] for part in text.split("; ")] for text in reasons)
    index = manifest.read_index(uri)
    skipped = ((index.get("config") or {}).get("gate") or {}).get("not_checked", [])
    return f"{passed} of {len(ok)} targets passed the quality gate; {checks_line(checks, skipped)}"


def _auto_storage(out: str):
    from tasks.runtime import result_storage

    return result_storage(storage.join(storage.normalize(out), STAGE, "auto"))

