"""Face detection (MTCNN, weights shipped in facenet_pytorch) and FFHQ five-point alignment, on real photos."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("facenet_pytorch")

from bfr_models.faces import (  # noqa: E402
    FFHQ_TEMPLATE_512,
    FaceAligner,
    FaceCrop,
    contact_sheet,
    demo_photos,
    estimate_similarity,
    ffhq_template,
    warp_face,
)

# MTCNN's ONet regresses landmarks from a 48x48 resample of the face box, so one ONet input
# pixel is box_width / 48 image pixels. Re-detecting on an aligned crop should reproduce
# the landmarks to about one such cell; we allow 1.5 (about 8 px on a 512 crop, measured: <= 5.4).
ONET_CELLS = 1.5


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return dict(demo_photos())


@pytest.fixture(scope="module")
def aligner() -> FaceAligner:
    return FaceAligner()


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


# -- the transform ------------------------------------------------------------------------------------
def test_template_to_template_is_identity():
    for size in (512, 256, 1024):
        m = estimate_similarity(ffhq_template(size), ffhq_template(size))
        np.testing.assert_allclose(m, np.eye(2, 3), atol=1e-9)
    np.testing.assert_allclose(ffhq_template(256), FFHQ_TEMPLATE_512 / 2)


def test_similarity_recovers_known_transform_and_matches_skimage():
    truth = _similarity(17.0, 0.37, 40.0, -12.5)
    src = _apply(np.linalg.inv(np.vstack([truth, [0, 0, 1]]))[:2], FFHQ_TEMPLATE_512)
    np.testing.assert_allclose(estimate_similarity(src, FFHQ_TEMPLATE_512), truth, atol=1e-9)

    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(0)
    noisy = src + rng.normal(0, 3, src.shape)
    ref = transform.SimilarityTransform.from_estimate(noisy, FFHQ_TEMPLATE_512) if hasattr(
        transform.SimilarityTransform, "from_estimate") else None
    if ref is None:
        ref = transform.SimilarityTransform()
        assert ref.estimate(noisy, FFHQ_TEMPLATE_512)
    np.testing.assert_allclose(estimate_similarity(noisy, FFHQ_TEMPLATE_512), ref.params[:2], atol=1e-6)


@pytest.mark.parametrize("size", [512, 64])  # upsampling path, and the area-resampled downscale path
def test_warp_puts_landmarks_on_template(size):
    """Dots drawn at known source landmarks land on the template points of the crop."""
    m_true = _similarity(-23.0, 0.9, 60.0, 150.0)  # template(512) -> source
    src_pts = _apply(m_true, FFHQ_TEMPLATE_512)
    img = np.zeros((700, 700, 3), np.uint8)
    yy, xx = np.mgrid[0:700, 0:700]
    for x, y in src_pts:
        blob = 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 6.0**2))
        img = np.maximum(img, blob[..., None].astype(np.uint8))
    crop, m, scale, border = warp_face(img, src_pts, size)
    assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
    assert scale == pytest.approx(1 / 0.9 * size / 512)
    gray = crop[..., 0].astype(np.float64)
    for tx, ty in ffhq_template(size):
        r = max(3, int(size / 20))
        x0, y0 = int(tx) - r, int(ty) - r
        patch = gray[y0 : y0 + 2 * r + 1, x0 : x0 + 2 * r + 1]
        py, px = np.mgrid[0 : patch.shape[0], 0 : patch.shape[1]]
        cx, cy = (patch * px).sum() / patch.sum() + x0, (patch * py).sum() / patch.sum() + y0
        # within a tenth of a blob sigma (blob sigma in crop px = 6 * scale), and under a pixel
        assert abs(cx - tx) < max(0.6, 0.1 * 6 * scale) and abs(cy - ty) < max(0.6, 0.1 * 6 * scale), (cx, cy, tx, ty)


def test_downscaled_crop_is_antialiased():
    """1-pixel stripes must average to gray when the crop is smaller than the face, not alias."""
    img = np.zeros((600, 600, 3), np.uint8)
    img[:, ::2] = 255
    src_pts = _apply(_similarity(10.0, 1.0, 40.0, 40.0), FFHQ_TEMPLATE_512)  # face ~512 px
    crop, m, scale, _ = warp_face(img, src_pts, 128)
    assert scale < 0.3
    naive = cv2.warpAffine(img, m, (128, 128), flags=cv2.INTER_LINEAR)
    assert crop[16:-16, 16:-16].std() < 8, crop.std()
    assert naive.std() > 30  # what point sampling does


def test_reflect_border_matches_full_image_warp(photos, aligner):
    """The ROI shortcut gives the same pixels as warping the whole image (Tom Hanks' 112x112
    crop leaves much of the FFHQ square outside the image)."""
    img = photos["Tom_Hanks_54745"]
    (face,) = aligner.align([img])[0]
    assert face.border_fraction > 0.3
    for mode, flag in [("reflect", cv2.BORDER_REFLECT_101), ("constant", cv2.BORDER_CONSTANT)]:
        crop, m, _, _ = warp_face(img, face.landmarks, 512, mode)
        ref = cv2.warpAffine(img, m, (512, 512), flags=cv2.INTER_LINEAR, borderMode=flag, borderValue=(135, 133, 132))
        assert np.abs(crop.astype(int) - ref).max() <= 1


# -- detection + alignment on real photos -----------------------------------------------------------
def test_astronaut_one_face_plausible_landmarks(photos, aligner):
    img = photos["astronaut"]
    (dets,) = aligner.detect([img])
    assert len(dets) == 1
    d = dets[0]
    assert d.score > 0.99
    (le, re, nose, ml, mr) = d.landmarks
    x0, y0, x1, y1 = d.box
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in d.landmarks)
    assert le[0] < re[0] and ml[0] < mr[0]  # left of right (image coordinates)
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1])  # eyes above nose above mouth
    assert le[0] < nose[0] < re[0]
    # Eileen Collins' face is in the upper middle of the 512x512 photo.
    assert 150 < x0 < x1 < 300 and 30 < y0 < y1 < 200


def test_aligned_crop_redetects_on_template(photos, aligner):
    img = photos["astronaut"]
    (crops,) = aligner.align([img])
    (c,) = crops
    assert isinstance(c, FaceCrop) and c.face_index == 0
    assert c.image.shape == (512, 512, 3) and c.image.dtype == np.uint8
    assert c.box.shape == (4,) and c.landmarks.shape == (5, 2)
    assert c.border_fraction == 0.0 and c.scale > 1

    template = ffhq_template(512)
    mapped = _apply(c.affine, c.landmarks)  # where the source landmarks went
    fit_residual = np.linalg.norm(mapped - template, axis=1)  # a face is no exact similarity of the template
    assert fit_residual.max() < 20  # least-squares: a frontal face fits within a few % of the crop

    redet = FaceAligner(min_score=0.5).detect([c.image])[0]
    assert len(redet) == 1
    d = redet[0]
    tol = ONET_CELLS * (d.box[2] - d.box[0]) / 48
    assert 5 < tol < 12
    jitter = np.linalg.norm(d.landmarks - mapped, axis=1)
    assert jitter.max() < tol, (jitter, tol)
    assert (np.linalg.norm(d.landmarks - template, axis=1) < fit_residual + tol).all()
    # eyes level and centred as in FFHQ
    (le, re) = d.landmarks[:2]
    assert abs(np.degrees(np.arctan2(re[1] - le[1], re[0] - le[0]))) < 2.0
    assert abs((le[0] + re[0]) / 2 - template[:2, 0].mean()) < tol
    assert abs(d.landmarks[:, 0].mean() - 256) < 2 * tol


def test_group_photo_finds_everyone_and_min_score_filters(photos):
    img = photos["t1"]
    default = FaceAligner(size=128).align([img])[0]
    # Six people at the poker table (counted by eye), all found, nothing else at the defaults.
    assert 6 <= len(default) <= 6
    assert all(c.score >= 0.9 for c in default)
    areas = [(c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) for c in default]
    assert areas == sorted(areas, reverse=True)
    assert [c.face_index for c in default] == list(range(len(default)))
    assert all(c.image.shape == (128, 128, 3) for c in default)

    # min_score: same detector settings, only the score cut differs. With MTCNN's own pyramid
    # start (20 px: min_size 27) it also proposes a hand holding a chip and a glass (~0.86).
    def boxes(min_score):
        return FaceAligner(size=64, min_size=27, min_score=min_score).detect([img])[0]

    loose, mid, strict = boxes(0.5), boxes(0.9), boxes(0.999)
    assert len(loose) > len(mid) > len(strict) >= 1
    assert len(mid) == 6
    for cut, dets in [(0.5, loose), (0.9, mid), (0.999, strict)]:
        assert all(d.score >= cut for d in dets)
    assert any(d.score < 0.9 for d in loose)
    for d in mid:  # the strict set is a subset of the loose one
        assert min(np.abs(d.box - e.box).max() for e in loose) < 1e-3

    assert len(FaceAligner(size=64, max_faces=2).detect([img])[0]) == 2
    sides = sorted(min(c.box[2] - c.box[0], c.box[3] - c.box[1]) for c in default)
    cut = float(sides[2] + sides[3]) / 2  # about half the faces are smaller
    big = FaceAligner(size=64, min_size=cut).detect([img])[0]
    assert 1 <= len(big) < 6
    assert all(min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= cut for d in big)


def test_batch_equals_single_and_empty_inputs(photos, aligner):
    astro = photos["astronaut"]
    flipped = np.ascontiguousarray(astro[:, ::-1])
    blank = np.full((512, 512, 3), 128, np.uint8)
    tiny = np.zeros((8, 10, 3), np.uint8)
    batch = aligner.detect([astro, flipped, blank, tiny, photos["Tom_Hanks_54745"]])
    assert [len(d) for d in batch] == [1, 1, 0, 0, 1]
    for img, dets in [(astro, batch[0]), (flipped, batch[1])]:
        (single,) = aligner.detect([img])[0]
        np.testing.assert_allclose(dets[0].landmarks, single.landmarks, atol=1e-3)
    # the mirror image: left/right swap, x mirrored
    m = batch[1][0].landmarks
    mirrored = np.stack([511 - batch[0][0].landmarks[:, 0], batch[0][0].landmarks[:, 1]], 1)[[1, 0, 2, 4, 3]]
    assert np.abs(m - mirrored).max() < 4
    assert aligner.align([]) == []
    assert aligner.align([blank]) == [[]]


def test_bad_input_is_rejected_with_index(aligner):
    with pytest.raises(ValueError, match="image 1"):
        aligner.align([np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        aligner.align([np.zeros((64, 64, 3), np.float32)])
    with pytest.raises(ValueError, match="border_mode"):
        FaceAligner(border_mode="wrap")


def test_demo_photos_and_contact_sheet(photos, aligner, tmp_path):
    assert list(photos) == ["astronaut", "t1", "Tom_Hanks_54745"]
    for img in photos.values():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    results = aligner.align(list(photos.values()))
    assert [len(r) for r in results] == [1, 6, 1]
    crops = [c.image for r in results for c in r]
    sheet = contact_sheet(crops, cols=4, tile=128)
    assert sheet.shape == (256, 512, 3)
    from PIL import Image

    Image.fromarray(sheet).save(tmp_path / "faces_demo.png")
