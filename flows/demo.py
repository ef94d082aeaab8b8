"""The demo photos: real face photos shipped by installed packages, written out as PNGs; and what a recipe
run says about its pseudo targets (the quality gate's count, and what a prior trained here can show).

The demo itself is a recipe, ``catalogs/recipes/demo.yaml`` (``bfr-curate demo`` runs it).
"""

from __future__ import annotations

import json

from bfr_models import manifest, storage
from bfr_models.faces import demo_photos
from bfr_models.imageio import encode_png


def write_demo_photos(out: str) -> str:
    """Write the packaged demo photos as PNGs under <out>/photos and return that folder."""
    folder = storage.join(storage.normalize(out), "photos")
    for name, rgb in demo_photos():
        storage.write_bytes_atomic(storage.join(folder, f"{name}.png"), encode_png(rgb))
    return folder


def pseudo_target_summary(results: dict[str, str]) -> str:
    """The gate's line for a recipe's pseudo targets, and, for a prior the recipe trained itself, a plain warning."""
    from bfr_models.report_stages import trained_prior_note
    from flows.pseudo_targets import gate_summary

    lines = [gate_summary(results["pseudo-targets"])]
    if "prior" in results and storage.exists(storage.join(results["prior"], "prior.json")):  # a folder, not a card
        faces = results.get("clean") or results.get("ingest")  # what the prior trained on (else a folder)
        count = int((manifest.read_manifest(faces)["status"] == "ok").sum()) if faces else None
        meta = json.loads(storage.read_bytes(storage.join(results["prior"], "prior.json")))
        note = trained_prior_note(meta.get("source"), count)
        if note:
            lines.append(f"NOTE: {note}")
    return "\n".join(lines)
