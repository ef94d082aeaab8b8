"""The demo: real face photos shipped by packages -> aligned faces -> degraded sets."""

from __future__ import annotations

from prefect import flow

from bfr_models import storage
from bfr_models.faces import demo_photos
from bfr_models.imageio import encode_png
from flows.degrade import degrade_flow
from flows.ingest import ingest_flow

DEMO_DEGRADATIONS = [("gfpgan", None, None), ("dr2", "medium", 8.0)]


def write_demo_photos(out: str) -> str:
    """Write the packaged demo photos as PNGs under <out>/photos and return that folder."""
    folder = storage.join(storage.normalize(out), "photos")
    for name, rgb in demo_photos():
        storage.write_bytes_atomic(storage.join(folder, f"{name}.png"), encode_png(rgb))
    return folder


@flow(name="demo")
def demo_flow(photos: str, out: str, device: str = "auto") -> dict[str, str]:
    faces = ingest_flow(input=photos, out=out, device=device)
    results = {"ingest": faces}
    for preset, split, scale in DEMO_DEGRADATIONS:
        label = preset if split is None else f"{preset}/{split}/x{scale:g}"
        results[f"degrade {label}"] = degrade_flow(input=faces, out=out, preset=preset, split=split, scale=scale,
                                                   device=device)
    return results
