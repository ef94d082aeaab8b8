"""The demo: real face photos shipped by packages -> aligned faces -> degraded sets."""

from __future__ import annotations

from prefect import flow

from bfr_models import storage
from bfr_models.faces import demo_photos
from bfr_models.imageio import encode_png
from flows.degrade import degrade_flow
from flows.ingest import ingest_flow
from flows.report import report_flow
from flows.score import score_flow

DEMO_METRICS = "niqe,musiq,lpips,psnr,ssim"
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
    scored = []
    for preset, split, scale in DEMO_DEGRADATIONS:
        label = preset if split is None else f"{preset}/{split}/x{scale:g}"
        degraded = degrade_flow(input=faces, out=out, preset=preset, split=split, scale=scale, device=device)
        results[f"degrade {label}"] = degraded
        # metrics whose weights are not in the model cache are skipped and listed in the report
        results[f"score {label}"] = score_flow(input=degraded, out=out, metrics=DEMO_METRICS, skip_missing=True,
                                               device=device)
        scored.append(results[f"score {label}"])
    results["report"] = report_flow(input=scored[0], compare=scored[1:],
                                    out=storage.join(storage.normalize(out), "report.html"),
                                    title="bfr-curate demo: GFPGAN vs DR2 degradations")
    return results
