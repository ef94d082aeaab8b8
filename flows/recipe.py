"""Recipes: a YAML file naming each stage's parameters, run as one Prefect flow of cached stages.

A recipe (``catalogs/recipes/*.yaml``)::

    name: demo
    photos: demo                   # a folder / fsspec URL of photos, or "demo" (the packaged photos)
    ingest: {size: 256}
    idm: {uri: <model folder>}     # or {train: {resolution: 128, ...}}: the IDM restorer for clean
    clean: {rounds: 1}             # IDM cleaning of the faces; the cleaned set feeds the stages after it
    degrade: {preset: dr2, split: medium, scale: 8}
    score_degraded: true           # false: score only the targets (e.g. LR inputs of an SR protocol)
    prior: {train: {resolution: 64, steps: 600}}     # or {uri: <prior folder or model card>}
    pseudo_targets: {method: dr2, auto: true}
    score: {metrics: "niqe,psnr,ssim,lpips", skip_missing: true}
    report: {title: "..."}

Stages run in that order (ingest -> [idm train] -> clean -> degrade -> [prior train] -> pseudo-targets
-> score -> report).
Each is cached by its config and its inputs' content, so editing one stage's parameters re-runs
only that stage and the ones after it. Omitted stages are skipped (a recipe without ``ingest``
takes ``photos`` as aligned faces).
"""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from bfr_models import storage
from flows.degrade import degrade_flow
from flows.idm import clean_flow, idm_train_flow
from flows.ingest import ingest_flow
from flows.prior import prior_train_flow
from flows.pseudo_targets import pseudo_targets_flow
from flows.report import report_flow
from flows.run_info import call_flow, run_name
from flows.score import score_flow
from flows.stage import subflow_runner

STAGE_FLOWS = (ingest_flow, idm_train_flow, clean_flow, degrade_flow, prior_train_flow, pseudo_targets_flow, score_flow,
               report_flow)
STAGES = ("ingest", "idm", "clean", "degrade", "prior", "pseudo_targets", "score", "report")
_TOP = ("name", "description", "photos", "score_degraded", *STAGES)
# options every stage flow takes from the command line, not from the recipe
_RUNTIME = {"input", "out", "device"}


class RecipeError(ValueError):
    """A recipe that cannot run: unreadable, unknown keys, missing required values. One line."""


def recipes_dir() -> Path:
    from bfr_models.choices import catalogs_dir

    return catalogs_dir() / "recipes"


def _check_options(stage: str, options, fn, path) -> dict:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RecipeError(f"recipe {path}: '{stage}' must be a mapping of options")
    allowed = set(inspect.signature(fn.fn).parameters) - _RUNTIME
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RecipeError(f"recipe {path}: {stage}.{unknown[0]} is not an option (options: {', '.join(sorted(allowed))})")
    return dict(options)


def load_recipe(path: str) -> dict:
    """Parse and validate a recipe (a path, or a name in catalogs/recipes)."""
    import yaml

    p = Path(path)
    if not p.exists() and (recipes_dir() / f"{path}.yaml").exists():
        p = recipes_dir() / f"{path}.yaml"
    if not p.exists():
        raise RecipeError(f"recipe not found: {path} (recipes: {', '.join(sorted(x.stem for x in recipes_dir().glob('*.yaml')))})")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {p}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p}: expected a mapping")
    unknown = sorted(set(data) - set(_TOP))
    if unknown:
        raise RecipeError(f"recipe {p}: unknown key '{unknown[0]}' (keys: {', '.join(_TOP)})")
    if not data.get("photos"):
        raise RecipeError(f"recipe {p}: 'photos' (a folder, fsspec URL or 'demo') is required")
    name = str(data.get("name", p.stem))
    try:  # the default output is ./runs/<name>: a name must not lead out of it
        storage.confined_join("runs", name)
    except ValueError:
        raise RecipeError(f"recipe {p}: name {name!r} must be a plain name (it names the folder ./runs/<name>)"
                          ) from None
    recipe = {"name": name, "photos": str(data["photos"]), "path": str(p),
              "score_degraded": bool(data.get("score_degraded", True))}
    flows = {"ingest": ingest_flow, "clean": clean_flow, "degrade": degrade_flow, "pseudo_targets": pseudo_targets_flow,
             "score": score_flow, "report": report_flow}
    for stage, fn in flows.items():
        if stage in data:
            recipe[stage] = _check_options(stage, data[stage], fn, p)
    for stage, train_fn in (("prior", prior_train_flow), ("idm", idm_train_flow)):
        if stage in data:
            spec = data[stage] or {}
            if not isinstance(spec, dict) or len(spec) != 1 or not ({"uri", "train"} & set(spec)):
                raise RecipeError(f"recipe {p}: {stage} must be {{uri: <{stage} folder>}} or {{train: {{...}}}}")
            recipe[stage] = {"uri": str(spec["uri"])} if "uri" in spec else {
                "train": _check_options(f"{stage}.train", spec["train"], train_fn, p)}
    if "clean" in recipe and "idm" not in recipe and "model" not in recipe["clean"]:
        raise RecipeError(f"recipe {p}: clean needs a model (an 'idm' section or clean.model)")
    if "pseudo_targets" in recipe:
        if "prior" not in recipe and "prior" not in recipe["pseudo_targets"]:
            raise RecipeError(f"recipe {p}: pseudo_targets needs a prior (a 'prior' section or pseudo_targets.prior)")
    if "report" in recipe and "score" not in recipe:
        raise RecipeError(f"recipe {p}: report needs a score section")
    return recipe


# bounded by default too: a served (scheduled) recipe has no --workers, and every stage inherits this runner
@flow(name="recipe", flow_run_name=run_name, task_runner=ThreadPoolTaskRunner(max_workers=2))
def recipe_flow(recipe: dict, out: str, device: str = "auto") -> dict[str, str]:
    """Run a validated recipe; returns each stage's output URI (and the report's path).

    Every stage runs on this flow's task runner (``--workers``/``--dask``): a subflow otherwise gets its own
    default runner, a thread pool without a bound, and would run all its shards at once. Each stage run is
    tagged (:func:`flows.run_info.call_flow`).
    """
    runner = subflow_runner()
    ingest_flow, idm_train_flow, clean_flow, degrade_flow, prior_train_flow, pseudo_targets_flow, score_flow, \
        report_flow = (partial(call_flow, f.with_options(task_runner=runner)) for f in STAGE_FLOWS)
    out = storage.normalize(out)
    photos = recipe["photos"]
    if photos == "demo":
        from flows.demo import write_demo_photos

        photos = write_demo_photos(out)
    results = {}
    faces = photos
    if "ingest" in recipe:
        faces = results["ingest"] = ingest_flow(input=photos, out=out, device=device, **recipe["ingest"])
    if "clean" in recipe:  # the cleaned dataset is what the later stages work on
        opts = dict(recipe["clean"])
        if "idm" in recipe:
            spec = recipe["idm"]
            opts["model"] = results["idm"] = spec["uri"] if "uri" in spec else idm_train_flow(
                input=faces, out=out, device=device, **spec["train"])
        faces = results["clean"] = clean_flow(input=faces, out=out, device=device, **opts)
    current = faces
    if "degrade" in recipe:
        current = results["degrade"] = degrade_flow(input=faces, out=out, device=device, **recipe["degrade"])
    to_score = {}  # label -> manifest; the last one is the report's main set
    # LR inputs of another size than the faces (x4 SR protocols) have no full-reference scores: skippable
    if recipe["score_degraded"] or "pseudo_targets" not in recipe:
        to_score["degrade" if "degrade" in recipe else "clean" if "clean" in recipe else "input"] = current
    if "pseudo_targets" in recipe:
        opts = dict(recipe["pseudo_targets"])
        if "prior" in recipe:
            spec = recipe["prior"]
            opts["prior"] = spec["uri"] if "uri" in spec else prior_train_flow(
                input=faces, out=out, device=device, **spec["train"])
            results["prior"] = opts["prior"]
        current = results["pseudo-targets"] = pseudo_targets_flow(input=current, out=out, device=device, **opts)
        to_score["pseudo-targets"] = current
    if "score" in recipe:
        # every set is scored alike; full-reference metrics against the faces (found through the lineage)
        for label, uri in to_score.items():
            results[f"score {label}"] = score_flow(input=uri, out=out, device=device, reference=faces, **recipe["score"])
        scored = [results[f"score {label}"] for label in to_score]
        if "report" in recipe:
            results["report"] = report_flow(input=scored[-1], compare=scored[:-1],
                                             out=storage.join(out, "report.html"),
                                             **{"title": f"bfr-curate: {recipe['name']}", **recipe["report"]})
    return results
