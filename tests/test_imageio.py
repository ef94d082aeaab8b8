import struct
import zlib

import numpy as np
import pytest

from bfr_models.imageio import ImageError, decode_rgb, encode_png
from tests.conftest import face_like

EXPECTED_ERRORS = {"zero.png": "empty file", "truncated.jpg": "truncated", "text.png": "not a recognised",
                   "huge.png": "20000x20000"}


def test_every_bad_input_decodes_or_gives_a_reason(bad_folder):
    good = face_like(0)
    for path in sorted(bad_folder.iterdir()):
        data = path.read_bytes()
        if path.name in EXPECTED_ERRORS:
            with pytest.raises(ImageError, match=EXPECTED_ERRORS[path.name]):
                decode_rgb(data)
            continue
        rgb, mode = decode_rgb(data)
        assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3), path.name
        if path.name in ("gray.png", "gray16.png"):
            assert np.array_equal(rgb[..., 0], rgb[..., 2])
            src = good[..., 1] if path.name == "gray.png" else good[..., 0]
            assert np.abs(rgb[..., 0].astype(int) - src).max() <= 1
        if path.name in ("ok.png", "rgb16.png"):
            assert np.abs(rgb.astype(int) - good).max() <= 1, path.name
        if path.name == "rgba.png":  # half-transparent over white: brighter than the source
            expect = (good.astype(float) * 128 + 255 * 127) / 255
            assert np.abs(rgb - expect).max() <= 2
        if path.name == "cmyk.jpg":
            assert mode == "CMYK" and np.abs(rgb.astype(int) - good).mean() < 8


def test_png_roundtrip_is_lossless_and_deterministic():
    rgb = face_like(3)
    a, b = encode_png(rgb), encode_png(rgb)
    assert a == b
    back, mode = decode_rgb(a)
    assert mode == "RGB" and np.array_equal(back, rgb)


def test_png_is_written_as_cv2_imwrite_writes_it():
    """OpenCV's default PNG settings (BasicSR's and GFPGAN's writers): zlib's fastest level, the Sub filter."""
    rgb = face_like(4)
    png = encode_png(rgb)
    idat, pos = b"", 8
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        idat += png[pos + 8 : pos + 8 + length] if kind == b"IDAT" else b""
        pos += 12 + length
    assert idat[1] >> 6 == 0  # the zlib header's FLEVEL: 0 is the fastest (level 3 writes 1)
    rows = zlib.decompress(idat)
    stride = 1 + rgb.shape[1] * 3
    assert {rows[r * stride] for r in range(rgb.shape[0])} == {1}  # each row's filter type: Sub
