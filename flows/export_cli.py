"""`bfr-curate export` and `bfr-curate runs`: training-ready copies named by source file, and what ran where.

Wired into the main parser by ``add_export_parsers(subparsers)``.
"""

from __future__ import annotations

from flows.export_formats import FORMATS, META_INFO, NAMES_FILE, PAIR_DIRECTION


def cmd_export(args) -> None:
    from bfr_models import manifest
    from flows.export import ExportError, export_manifest

    if not manifest.is_manifest(args.input):
        raise ExportError(f"not a manifest: {args.input} (a stage folder with index.json, its index.json, "
                          "or a .parquet file)")
    result = export_manifest(args.input, args.format, args.out, include_failed=args.include_failed,
                             samples_per_shard=args.samples_per_shard)
    left = ", ".join(f"{n} {why}" for why, n in result["left_out"].items() if n)
    unit = "samples" if args.format == "webdataset" else ("pairs" if args.format in ("paired", "basicsr") else "images")
    print(f"export: {result['written']} {unit} ({args.format}) -> {result['out']}/"
          + (f"  (left out: {left} rows)" if left else ""))
    if result["left_out"].get("gate"):
        print("  rows failing the target gate are left out; --include-failed keeps them")


def cmd_runs(args) -> None:
    from flows.export import list_runs
    from flows.text_table import text_table

    runs = list_runs(args.out)
    if not runs:
        print(f"no stage runs under {args.out}")
        return
    rows = [[r["stage"], r["key"], r.get("input", "-"), r.get("config") or r.get("problem", ""), r.get("ok"),
             r.get("error"), r["created"]] for r in runs]
    print(text_table(["stage", "key", "input", "config", "ok", "error", "created"], rows, max_width=200))


def add_export_parsers(sub) -> None:
    pairs = "; ".join(f"{stage}: " + ("lq = the row's image, gt = its parent" if d == "row_is_lq"
                                      else "lq = the parent, gt = the row's image")
                      for stage, d in PAIR_DIRECTION.items())
    p = sub.add_parser(
        "export", help="copy a manifest's images into a training layout, named by source file",
        description="Write the ok rows of a manifest as PNG files named after their source file "
                    "(name__2, name__3 ... when several rows share one). folder: <name>.png; paired: lq/ and gt/ "
                    f"with equal names ({pairs}); basicsr: paired plus {META_INFO} for BasicSR's "
                    "PairedImageDataset (meta_info_file); webdataset: tar shards of <name>.lq.png, <name>.gt.png "
                    f"and <name>.json (ids, params, metrics). folder/paired/basicsr also write {NAMES_FILE} "
                    "(name -> image_id, parent_id). Rows whose target failed the gate are left out unless "
                    "--include-failed.")
    p.add_argument("-i", "--input", required=True, help="a manifest: stage folder, its index.json or a .parquet file")
    p.add_argument("--format", required=True, choices=FORMATS, help="layout to write")
    p.add_argument("-o", "--out", required=True, help="a new or empty folder, or fsspec URL (s3://bucket/export)")
    p.add_argument("--include-failed", action="store_true", help="also export rows whose gate is not 'pass'")
    p.add_argument("--samples-per-shard", type=int, default=1000,
                   help="webdataset: samples per tar shard (default 1000)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("runs", help="list the stage runs under an output root",
                       description="One line per complete stage run under <out>/<stage>/<key>/: stage, key, "
                                   "input, a short config summary, ok/error rows and when it was written.")
    p.add_argument("out", help="output root (the --out of the stages)")
    p.set_defaults(func=cmd_runs)
