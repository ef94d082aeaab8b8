"""`bfr-curate models list|pull|add`: the only commands that fetch weight files.

Wire into the main parser with ``add_models_parser(subparsers)``. Handlers raise ValueError /
FileNotFoundError subclasses with one-line messages; the command line prints them as
``bfr-curate: error: ...`` and exits 2 (flows/errors.py).
"""

from __future__ import annotations

import argparse

CARDS_HELP = ("Each model has a card in catalogs/models/<name>.yaml (URL, sha256, licence, what uses it). "
              "Files are kept in the model cache: $BFR_CURATE_MODEL_CACHE, default ~/.cache/bfr-curate/models. "
              "No stage downloads anything by itself.")


class ModelsUsageError(ValueError):
    """Contradictory or missing arguments to a models subcommand."""


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def cmd_models_list(args) -> None:
    from bfr_models import models

    cards = models.load_cards()
    cache = models.model_cache_dir()
    rows, present = [], 0
    for card in cards.values():
        if args.verify and models.state(card) != "missing":
            models.check_cached(card)  # hashes unverified files; a wrong one raises ModelHashError
        st = models.state(card)
        if st == "missing":
            where = "no"
        else:
            present += 1
            where = f"yes {models.cached_path(card)}" + {"unverified": " (not yet verified)",
                                                          "unpinned": " (sha256 not pinned)"}.get(st, "")
        rows.append([card.name, card.filename, where, card.license, "; ".join(card.used_by)])
    if not rows:
        print(f"no model cards in {models.catalogs_dir() / 'models'}")
        return
    print(_table(rows, ["name", "file", "present", "licence", "used by"]))
    print(f"\n{present} of {len(rows)} present in the model cache {cache}")
    if present < len(rows):
        print("fetch missing files with `bfr-curate models pull NAME` (or --all); "
              "register a copy you have with `bfr-curate models add NAME --from PATH`")


def cmd_models_pull(args) -> None:
    from bfr_models import model_fetch, models

    if args.all and args.names:
        raise ModelsUsageError("give model names or --all, not both")
    if not args.all and not args.names:
        raise ModelsUsageError("name the model(s) to pull, or --all (see `bfr-curate models list`)")
    cards = models.load_cards()
    names = list(cards) if args.all else list(dict.fromkeys(args.names))
    for name in names:
        models.get_card(name, cards)  # unknown names fail before any download
    if args.from_url and len(names) != 1:
        raise ModelsUsageError("--from-url needs exactly one model name")
    failures: list[str] = []
    for name in names:
        try:
            path = model_fetch.pull(name, source=args.from_url, progress=not args.quiet, force=args.force)
        except (models.ModelHashError, models.ModelDownloadError) as e:
            if len(names) == 1:
                raise
            print(f"{name}: FAILED: {e}")
            failures.append(name)
            continue
        print(f"{name}: {path} ({models.cached_check_result(cards[name], path)})")
    if failures:
        raise models.ModelDownloadError(f"{len(failures)} of {len(names)} models could not be pulled: "
                                        f"{', '.join(failures)} (reasons above)")


def cmd_models_add(args) -> None:
    from bfr_models import model_fetch, models

    path = model_fetch.add(args.name, args.from_path, progress=not args.quiet)
    print(f"{args.name}: {path} ({models.cached_check_result(models.get_card(args.name), path)})")


def add_models_parser(subparsers) -> argparse.ArgumentParser:
    """Add `models` with its `list`, `pull` and `add` subcommands to a subparsers object."""
    p = subparsers.add_parser("models", help="list, download (pull) or register (add) the weight files stages use",
                              description="Manage the weight files stages use. " + CARDS_HELP)
    sub = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")

    q = sub.add_parser("list", help="every model card and whether its file is in the model cache",
                       description="Print a table of every model card: name, file, whether it is present in the "
                                   "model cache (and where), licence, and what uses it. " + CARDS_HELP)
    q.add_argument("--verify", action="store_true",
                   help="hash every present file not verified yet (slow for large files)")
    q.set_defaults(func=cmd_models_list)

    q = sub.add_parser("pull", help="download model files through fsspec, verify their sha256, store them",
                       description="Download each named model's file from its card's URL (https://, s3://, "
                                   "file:// or any fsspec URL; then the card's mirrors), verify its sha256 and "
                                   "store it in the model cache. A file already there with the right hash is kept. "
                                   "A file whose hash differs is rejected and nothing is stored. " + CARDS_HELP)
    q.add_argument("names", nargs="*", metavar="NAME", help="model name(s), as `bfr-curate models list` shows")
    q.add_argument("--all", action="store_true", help="pull every model that has a card")
    q.add_argument("--from-url", metavar="URL", default=None,
                   help="download from this URL or path instead of the card's (a mirror, an s3:// copy); "
                        "the card's hash is still checked")
    q.add_argument("--force", action="store_true", help="download again even if a verified file is present")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_models_pull)

    q = sub.add_parser("add", help="register a weight file you already have (verify, copy into the cache)",
                       description="Verify that PATH is the file a model's card describes (sha256) and copy it "
                                   "into the model cache, for machines without internet. " + CARDS_HELP)
    q.add_argument("name", metavar="NAME", help="model name, as `bfr-curate models list` shows")
    q.add_argument("--from", dest="from_path", metavar="PATH", required=True,
                   help="the file you have: a local path or any fsspec URL")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_models_add)
    return p
