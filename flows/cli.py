"""The `bfr-curate` command line. Each command validates its arguments before any work starts."""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import traceback
import warnings

from flows.errors import UserError, explain, quiet_prefect_errors

EPILOG = "Outputs go to <out>/<stage>/<key>/ (index.json, shards/*.parquet, images/). Any fsspec URL works."


REPORT_NAME = "report.html"  # the file `report --out <folder>` writes
# Commands that run Prefect flows: the console command starts the Prefect API as they begin (flows/api_server.py)
FLOW_COMMANDS = {"degrade", "ingest", "run", "demo", "score", "report", "prior train", "pseudo-targets", "finetune",
                 "restore", "idm train", "clean"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help states it already or there is none (a flag, None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        none = action.default is None or action.default is False or action.default == [] or action.required
        if "default" in text or none or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of every command and subcommand (subparsers inherit the class): defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def _run(flow_fn, args, **params):
    from bfr_models import storage
    from flows.api_server import prefect_api
    from flows.cluster import check_contract, is_remote
    from flows.heap import freeze_imports
    from flows.run_info import call_flow
    from flows.runners import task_runner

    workers, dask = getattr(args, "workers", 1), getattr(args, "dask", None)  # single-task commands have neither
    if is_remote(dask):
        check_contract(dask, params)  # before anything is written: local paths, Prefect server, model cache
    if params.get("out"):
        storage.check_writable(params["out"])  # before any work: one line, never a bucket created

    with prefect_api(), task_runner(workers, dask, getattr(args, "debug", False)) as runner:
        freeze_imports()
        return call_flow(flow_fn.with_options(task_runner=runner), **params)


def _check_input(uri: str) -> None:
    from bfr_models import storage

    if not storage.exists(uri):
        raise UserError(f"input not found: {uri}")


def cmd_degrade(args):
    _check_input(args.input)  # before importing the stage (torch, Prefect): a typo is answered at once
    from flows.cluster import check_device
    from flows.degrade import degrade_config, degrade_flow

    degrade_config(args.preset, args.split, args.scale, args.seed)
    check_device(args.device, args.dask)
    from flows.warm import warm_in_background

    warm_in_background(args.dask, args.device, None)  # no network: only what the stage's end imports
    uri = _run(degrade_flow, args, input=args.input, out=args.out, preset=args.preset, split=args.split,
               scale=args.scale, seed=args.seed, shard_size=args.shard_size, batch_size=args.batch_size,
               device=args.device, exclude=args.exclude)
    _print_result("degrade", uri)


def cmd_ingest(args):
    _check_input(args.input)
    from flows.cluster import check_device
    from flows.ingest import ingest_flow

    check_device(args.device, args.dask)
    uri = _run(ingest_flow, args, input=args.input, out=args.out, size=args.size, min_score=args.min_score,
               min_size=args.min_size, shard_size=args.shard_size, batch_size=args.batch_size, device=args.device,
               exclude=args.exclude)
    _print_result("ingest", uri)


def cmd_demo(args):
    args.recipe = "demo"
    cmd_run(args)


def cmd_run(args):
    from bfr_models import storage
    from flows.cluster import check_device
    from flows.recipe import load_recipe, recipe_flow

    recipe = load_recipe(args.recipe)
    check_device(args.device, args.dask)
    out = args.out or f"./runs/{recipe['name']}"
    results = _run(recipe_flow, args, recipe=recipe, out=out, device=args.device)
    report = results.pop("report", None)
    folders = {k: results.pop(k) for k in ("prior", "idm") if k in results}  # model folders, not manifests
    for stage, uri in results.items():
        _print_result(stage, uri)
    for kind, uri in folders.items():
        print(f"{kind}: {uri}")
    if "pseudo-targets" in results:
        from flows.demo import pseudo_target_summary

        print(pseudo_target_summary({**results, **folders}))
    if report:
        print(f"report: {storage.normalize(report)}")


def cmd_score(args):
    _check_input(args.input)
    from flows.cluster import check_device
    from flows.score import default_metrics, plan_score, score_flow

    check_device(args.device, args.dask)
    metrics = args.metrics
    if metrics is None:
        metrics, note = default_metrics(args.input, args.reference)
        if note:
            print(note)
    opts = dict(input=args.input, metrics=metrics, reference=args.reference, fid_ref=args.fid_ref,
                niqe_convention=args.niqe_convention, crop_border=args.crop_border, y_channel=args.y_channel,
                lpips_net=args.lpips_net, fid_convention=args.fid_convention, skip_missing=args.skip_missing,
                fid_allow_small=args.fid_allow_small, exclude=args.exclude)
    config, _, skip, _ = plan_score(**opts)
    from flows.warm import warm_in_background
    from tasks.score import warm

    warm_in_background(args.dask, args.device, warm, config.as_dict(), skip, args.device)
    uri = _run(score_flow, args, out=args.out, shard_size=args.shard_size, batch_size=args.batch_size,
               device=args.device, **opts)
    if args.csv:
        from flows.readable import write_scores_csv

        print(f"per-image scores: {args.csv} ({write_scores_csv(uri, args.csv)} rows)")
    _print_result("score", uri)  # ends with the table of means and medians


def cmd_report(args):
    from bfr_models import manifest, storage

    for uri in [args.input, *args.compare]:
        _check_input(uri)
        if not manifest.is_manifest(uri):
            raise UserError(f"not a manifest: {uri} (a stage folder with index.json, its index.json, or a .parquet file)")
    labels = {}
    for text in args.label:
        name, sep, uri = text.partition("=")
        if not sep or not name or not uri:
            raise UserError(f"--label {text}: expected NAME=MANIFEST")
        if storage.normalize(uri) not in {storage.normalize(u) for u in [args.input, *args.compare]}:
            raise UserError(f"--label {text}: {uri} is not --input or one of --compare")
        labels[uri] = name
    out = args.out
    if out.endswith("/") or storage.isdir(out):
        out = storage.join(out, REPORT_NAME)  # a folder: the report goes inside it
    from flows.api_server import prefect_api
    from flows.heap import freeze_imports
    from flows.report import report_flow  # Prefect: only once the arguments are good
    from flows.run_info import call_flow

    with prefect_api():
        freeze_imports()
        uri = call_flow(report_flow, input=args.input, out=out, compare=args.compare, n_extremes=args.n,
                        labels=labels)
    print(f"report: {uri}")


def _print_result(stage: str, uri: str) -> None:
    from bfr_models import manifest, storage

    index = manifest.read_index(uri)
    df = manifest.read_manifest(uri)
    ok = int((df["status"] == "ok").sum())
    print(f"{stage}: {len(df)} rows ({ok} ok, {len(df) - ok} error)")
    print(f"  manifest: {storage.join(uri, manifest.INDEX_NAME)}")
    if storage.exists(storage.join(uri, "images")):
        print(f"  images:   {storage.join(uri, 'images')}/")
    print(f"  key:      {index['key']}")
    if index["config"].get("skipped_inputs"):
        print(f"  skipped:  {index['config']['skipped_inputs']} input files (dotfiles, --exclude)")
    if stage == "score":
        from flows.readable import score_summary

        print(score_summary(uri))


def cmd_presets(args):
    from bfr_models.degradations import list_presets, load_preset

    described = {name: load_preset(name).describe() for name in list_presets()}
    if args.json:
        print(json.dumps(described, indent=1, sort_keys=True, default=str))
        return
    from flows.readable import presets_table

    print(presets_table(described))
    print("(ranges as low-high; `bfr-curate presets --json` prints every parameter)")


def cmd_manifest_show(args):
    from bfr_models import manifest

    index = manifest.read_index(args.uri) if not args.uri.endswith(".parquet") else None
    df = manifest.read_manifest(args.uri, verify=args.verify)
    ok = int((df["status"] == "ok").sum()) if len(df) else 0
    print(f"manifest: {args.uri}")
    if index:
        print(f"stage:    {index['stage']}  key {index['key']}  created {index['created']}")
        print(f"shards:   {len(index['shards'])}")
    print(f"rows:     {len(df)}  ok {ok}  error {len(df) - ok}")
    if "split" in df and len(df):
        for split, n in df["split"].fillna("-").value_counts().sort_index().items():
            print(f"  split {split}: {n}")
    errors = df[df["status"] == "error"] if len(df) else df
    if len(errors):
        print("errors (first 10):")
        for r in errors.head(10).itertuples():
            print(f"  {r.parent_uri}: {r.error}")
    print("columns:  " + ", ".join(f"{c}:{t}" for c, t in zip(df.columns, df.dtypes)))
    if args.head:
        from flows.readable import head_table

        print(head_table(df, args.head))
    if args.verify:
        print(f"verified: {'every shard (size, sha256, rows) and ' if index else ''}every ok row's image (sha256)")


def cmd_gc(args):
    from flows.gc import delete, plan_gc

    _check_input(args.out)
    plans = plan_gc(args.out, min_age_s=args.min_age * 60)
    for plan in plans:
        print(f"{plan.folder}: {plan.skipped or plan.summary()}")
    files = sum(len(p.remove) for p in plans)
    size = sum(b for p in plans for _, _, b in p.remove) / 1e6
    if args.delete:
        delete(args.out, plans)
        print(f"removed {files} files ({size:.1f} MB)")
    else:
        print(f"would remove {files} files ({size:.1f} MB); pass --delete to remove them")


def _add_common(p, shard_size: int, batch_size: int, gpu_batch_from_memory: bool = False):
    p.add_argument("-o", "--out", required=True, help="output root: a folder or fsspec URL (s3://bucket/run)")
    p.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu or auto (default: auto)")
    p.add_argument("--shard-size", type=int, default=shard_size, help=f"images per Prefect task (default {shard_size})")
    if gpu_batch_from_memory:  # the flow picks the batch (bfr_models.device.default_batch_size)
        p.add_argument("--batch-size", type=int, default=None,
                       help=f"images per device batch (default: from free memory on CUDA, {batch_size} elsewhere)")
    else:
        p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per device batch (default {batch_size})")
    p.add_argument("--workers", type=int, default=2, help="shard tasks run at once (default 2)")
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run shard tasks on a Dask cluster: 'local' starts a LocalCluster, else a scheduler address "
                        "(default: a thread pool in this process)")
    add_exclude(p)


def add_training_dask(p) -> None:
    """--dask for the training commands: the training as one task on a Dask worker."""
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="train as one task on a Dask worker (a GPU one, GPU=1, when the workers advertise GPUs; "
                        "data read from the manifest's URLs): 'local' starts a LocalCluster of one worker, else "
                        "a scheduler address (default: in this process)")


def add_exclude(p) -> None:
    """--exclude GLOB for commands that read a folder: with dotfiles, the only files that get no row."""
    p.add_argument("--exclude", metavar="GLOB", action="append", default=[],
                   help="skip files of an input folder whose relative path or name matches GLOB (repeatable); "
                        "dotfiles are always skipped, every other file becomes a row")


def build_parser() -> argparse.ArgumentParser:
    from bfr_models.choices import list_presets

    parser = Parser(prog="bfr-curate", description="Data curation for blind face restoration.", epilog=EPILOG)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback (and Prefect's run errors) before the one-line message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("degrade", help="synthesise low-quality inputs with a degradation preset", epilog=EPILOG,
                       description="Degrade every image of --input with a preset, recording every sampled "
                                   "parameter and seed. Same input + seed = byte-identical output.")
    p.add_argument("-i", "--input", required=True, help="folder of images, fsspec URL, or a manifest")
    p.add_argument("--preset", required=True,
                   help=f"preset name: {', '.join(list_presets())} (ranges: `bfr-curate presets`)")
    p.add_argument("--split", default=None, help="preset split, e.g. mild/medium/severe for dr2")
    p.add_argument("--scale", type=float, default=None, help="preset scale, e.g. 4/8/16 for dr2")
    p.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it (default 0)")
    _add_common(p, shard_size=256, batch_size=8)
    p.set_defaults(func=cmd_degrade)

    p = sub.add_parser("ingest", help="detect, align and crop faces from photos (FFHQ-style)", epilog=EPILOG,
                       description="Detect faces with MTCNN, align them on five landmarks to the FFHQ template "
                                   "and crop. One manifest row per face; photos without a face become error rows.")
    p.add_argument("-i", "--input", required=True, help="folder of photos, fsspec URL, or a manifest")
    p.add_argument("--size", type=int, default=512, help="crop size in pixels (default 512)")
    p.add_argument("--min-score", type=float, default=0.9, help="minimum detection probability (default 0.9)")
    p.add_argument("--min-size", type=int, default=32, help="minimum face box side in pixels (default 32)")
    _add_common(p, shard_size=64, batch_size=4)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("run", help="run a recipe: ingest -> clean -> degrade -> pseudo-targets -> score -> report",
                       description="Runs a YAML recipe (a path, or a name in catalogs/recipes) as one Prefect "
                                   "flow. Every stage is cached by its config and inputs: editing one stage's "
                                   "parameters re-runs that stage and the ones after it. Prints the report's path.")
    p.add_argument("recipe", help="recipe YAML path or name (e.g. demo)")
    p.add_argument("-o", "--out", default=None, help="output root (default ./runs/<recipe name>)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--workers", type=int, default=2, help="shard tasks run at once (default 2)")
    p.add_argument("--dask", default=None, help="Dask: 'local' or a scheduler address (default: threads here)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the demo recipe (catalogs/recipes/demo.yaml) on the packaged photos",
                       description="Same as `bfr-curate run demo`: ingest, degrade, train a small prior, DR2 "
                                   "pseudo targets with --auto, score, report.")
    p.add_argument("-o", "--out", default="./runs/demo", help="output root (default ./runs/demo)")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto")
    p.add_argument("--workers", type=int, default=2, help="shard tasks run at once (default 2)")
    p.add_argument("--dask", default=None, help="Dask: 'local' or a scheduler address (default: threads here)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("presets", help="list every degradation preset with its parameter ranges",
                       description="A table of every degradation preset (catalogs/presets): splits, scale, blur "
                                   "and noise sigma, JPEG quality ranges and its description.")
    p.add_argument("--json", action="store_true", help="print every preset's full parameters as JSON instead")
    p.set_defaults(func=cmd_presets)

    from bfr_models.choices import (DEFAULT_METRICS, FULL_REFERENCE, KNOWN_METRICS, NO_REFERENCE,
                                    NO_REFERENCE_DEFAULT, SET_LEVEL)

    p = sub.add_parser("score", help=f"add metric columns ({', '.join(NO_REFERENCE + FULL_REFERENCE)}) and set-level "
                                     f"{', '.join(SET_LEVEL)} to a new manifest",
                       epilog=EPILOG, description="Score every image of --input (a manifest or a folder). "
                       "Full-reference metrics compare each image with --reference (a manifest, matched by "
                       "parent_id, or a folder, matched by file name) or, by default, with its parent image. "
                       "The input manifest is never modified. Weights come from model cards "
                       "(`bfr-curate models list`); a missing one stops the run before any work unless "
                       "--skip-missing, which records it as not computed.")
    p.add_argument("-i", "--input", required=True, help="manifest, folder or fsspec URL of images")
    p.add_argument("--metrics", default=None,
                   help=f"comma list of {','.join(KNOWN_METRICS)} (no-reference: {','.join(NO_REFERENCE)}; "
                        f"full-reference: {','.join(FULL_REFERENCE)}; set-level: {','.join(SET_LEVEL)}). Default: "
                        f"{DEFAULT_METRICS} when the images have a reference (--reference, or a manifest whose rows "
                        f"have parents), else {','.join(NO_REFERENCE_DEFAULT)} (those whose weights are pulled)")
    p.add_argument("--reference", default=None,
                   help=f"reference images for {','.join(FULL_REFERENCE)} (manifest or folder; default: each row's "
                        "parent image)")
    p.add_argument("--fid-ref", default=None, help="FID reference: stats .npz, manifest or folder (>= 2048 images)")
    p.add_argument("--fid-convention", default="clean", choices=["clean", "legacy_pytorch"],
                   help="FID resizing/network convention (default clean, as clean-fid)")
    p.add_argument("--fid-allow-small", action="store_true", help="accept a FID reference under 2048 images")
    p.add_argument("--niqe-convention", default="pyiqa", choices=["pyiqa", "live_computequality", "matlab"],
                   help="pyiqa/BasicSR (what BFR papers report; default) or live_computequality, the official LIVE "
                        "computequality.m (alias: matlab)")
    p.add_argument("--crop-border", type=int, default=0, help="pixels cropped from each border (default 0)")
    p.add_argument("--y-channel", action="store_true", help="PSNR/SSIM on the Y channel instead of RGB")
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"], help="LPIPS backbone (default vgg)")
    p.add_argument("--skip-missing", action="store_true", help="skip metrics whose weights are missing")
    p.add_argument("--csv", metavar="FILE", default=None,
                   help="also write every image's scores to FILE (path or fsspec URL): ids, source_name, split, "
                        "metrics")
    _add_common(p, shard_size=256, batch_size=8)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="write a self-contained HTML quality report of scored manifests",
                       description="Summary per stage/split, a sortable and filterable per-image table, "
                                   "histograms, best and worst images, clean | degraded | target strips from the "
                                   "lineage, with --compare paired per-image deltas and the fraction improved per "
                                   "metric; errors and metric conventions. One HTML file (full-size images beside "
                                   "it in <name>_files/ when too large to embed); also published as Prefect "
                                   "artifacts.")
    p.add_argument("-i", "--input", required=True, help="a scored manifest")
    p.add_argument("--compare", nargs="*", default=[], help="other scored manifests to compare")
    p.add_argument("-o", "--out", required=True,
                   help=f"where to write the HTML (path or fsspec URL); an existing folder gets {REPORT_NAME}")
    p.add_argument("--n", type=int, default=8, help="best/worst images shown per metric (default 8, at most 32)")
    p.add_argument("--label", action="append", default=[], metavar="NAME=MANIFEST",
                   help="name a set in the report (repeatable), e.g. --label dr2=runs/x/score/ab12; "
                        "default: its splits and stage key")
    p.set_defaults(func=cmd_report)

    from flows.export_cli import add_export_parsers
    from flows.models_cli import add_models_parser
    from flows.pseudo_targets_cli import add_prior_parsers
    from flows.training_cli import add_training_parsers

    add_models_parser(sub)
    add_export_parsers(sub)
    add_prior_parsers(sub, _add_common, _run, _print_result)
    add_training_parsers(sub, _add_common, _run, _print_result)

    p = sub.add_parser("gc", help="remove old shards, images and results no current index references",
                       description="In each stage folder <out>/<stage>/<key>/ with an index.json, finds shard files, "
                                   "images, FID feature files and Prefect shard results that no current index "
                                   "references (left by earlier code or config versions). Dry run unless --delete. "
                                   "Never touches anything outside <out>, a folder without an index, a folder "
                                   "written after its index (a run in progress), or a file newer than --min-age.")
    p.add_argument("out", help="output root of earlier runs (a folder or fsspec URL)")
    p.add_argument("--delete", action="store_true", help="remove the files (default: only list them)")
    p.add_argument("--min-age", type=float, default=10, help="minutes: newer files are kept (default 10)")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("manifest", help="inspect manifests")
    msub = p.add_subparsers(dest="manifest_command", required=True, metavar="SUBCOMMAND")
    q = msub.add_parser("show", help="summary of a manifest: rows, ok/error counts, splits, columns")
    q.add_argument("uri", help="a stage folder (with index.json), its index.json, or a .parquet file")
    q.add_argument("--verify", action="store_true",
                   help="also read every image the manifest names and check its sha256 (shards are always checked)")
    q.add_argument("--head", type=int, default=0, metavar="N",
                   help="also print the first N rows' values: image_id, source_name, split, status, metrics")
    q.set_defaults(func=cmd_manifest_show)
    return parser


def command_name(args) -> str:
    """The command as typed: 'degrade', 'prior train', ..."""
    sub = next((v for k, v in vars(args).items() if k.endswith("_command")), None)
    return f"{args.command} {sub}" if sub else args.command


_exit_code: list[int] = []  # the console command's, once main() returned


def _exit_without_teardown() -> None:
    """The console command's last exit step, after Python joined its threads and ran every other exit handler
    (Prefect's log and event flushes, the API server's stop): flush and leave, skipping the interpreter's
    teardown of its modules, ~1 s of freeing torch's and Prefect's objects at the end of every command. Files
    are all closed by then (written atomically, each within its own ``with``)."""
    if _exit_code:
        logging.shutdown()  # registered before this handler, so it would run after it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code[0])


def main(argv: list[str] | None = None) -> int:
    """The console command (``argv`` None: this process is the command) or one command called from Python."""
    if argv is None:
        atexit.register(_exit_without_teardown)  # the first handler registered runs last
        _exit_code.append(run_command(None))
        return _exit_code[0]
    return run_command(argv)


def run_command(argv: list[str] | None) -> int:
    # Prefect's INFO logs would drown the progress bar; PREFECT_LOGGING_LEVEL overrides this.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # this tool sends nothing anywhere: neither Prefect's server analytics nor its SDK telemetry (on by default
    # in an interactive terminal: prefect/_internal/analytics)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # slow, busy machines
    args = build_parser().parse_args(argv)
    if argv is None and command_name(args) in FLOW_COMMANDS:
        from flows.api_server import start_early
        from flows.heap import pause_collection
        from flows.warm import enable

        start_early()  # starts while the command imports torch and plans its inputs
        pause_collection()  # until the stage is imported: flows/heap.py
        enable()  # its networks load while Prefect starts: flows/warm.py
    from flows.stop import Interrupted, install_stop_handlers, say_stopped

    if not args.debug:
        quiet_prefect_errors()
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # torch internals, not ours
    install_stop_handlers()
    try:
        args.func(args)
    except Interrupted as e:  # SIGTERM / SIGINT: one line, finished shards kept
        say_stopped(str(e))
        return 1
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        code, text = explain(e)
        print(f"bfr-curate: error: {text}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
