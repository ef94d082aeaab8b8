"""The demo photos: real face photos shipped by installed packages, written out as PNGs.

The demo itself is a recipe, ``catalogs/recipes/demo.yaml`` (``bfr-curate demo`` runs it).
"""

from __future__ import annotations

from bfr_models import storage
from bfr_models.faces import demo_photos
from bfr_models.imageio import encode_png


def write_demo_photos(out: str) -> str:
    """Write the packaged demo photos as PNGs under <out>/photos and return that folder."""
    folder = storage.join(storage.normalize(out), "photos")
    for name, rgb in demo_photos():
        storage.write_bytes_atomic(storage.join(folder, f"{name}.png"), encode_png(rgb))
    return folder
