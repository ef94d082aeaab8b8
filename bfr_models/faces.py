"""Face detection (MTCNN) and FFHQ-style five-point alignment to square crops.

Detection uses ``facenet_pytorch.MTCNN``; its weights ship inside the package
(``facenet_pytorch/data/{p,r,o}net.pt``), so nothing is downloaded. Alignment estimates a
least-squares similarity transform (Umeyama, no reflection) from the five MTCNN landmarks
(left eye, right eye, nose, mouth left, mouth right; "left" = image left) to the FFHQ
five-point template that GFPGAN / facexlib use, and warps the image with it.

Border mode: ``reflect`` (cv2.BORDER_REFLECT_101) by default. FFHQ itself was made with
reflect padding (Karras et al.'s create-ffhq script), so reflected borders match the data
the restorers and priors were trained on; a constant fill puts a flat, hard-edged region
into the crop that no FFHQ image has, which degradations smear in unnatural ways and which
biases NIQE / MUSIQ / FID. The price is mirrored content near the border, so every crop
records ``border_fraction`` (share of its pixels that lie outside the source image) and
curation can drop crops that are mostly padding. ``border_mode="constant"`` is available
(fill = facexlib's gray, 135/133/132).

When the crop is smaller than the face in the source (scale < 1), the source region is
first area-resampled (cv2.INTER_AREA) to the target scale, then warped, so downscaled crops
are not aliased (warpAffine alone point-samples).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

# The FFHQ five-point template for a 512x512 crop, as in GFPGAN / facexlib
# (left eye, right eye, nose tip, left mouth corner, right mouth corner; x, y).
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

# facexlib's fill for constant borders.
CONSTANT_BORDER_VALUE = (135, 133, 132)

_BORDER_MODES = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


def ffhq_template(size: int = 512) -> np.ndarray:
    """The FFHQ five-point template scaled to a ``size`` x ``size`` crop, (5, 2) float64."""
    return FFHQ_TEMPLATE_512 * (float(size) / 512.0)


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping
    ``src`` points onto ``dst`` points (Umeyama 1991, reflections excluded). Returns 2x3."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two matching (N>=2, 2) point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    if var_s <= 0:
        raise ValueError("source points are all identical; no similarity transform")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1.0
    rot = u @ e @ vt
    scale = float((sig * np.diag(e)).sum() / var_s)
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - m[:, :2] @ mu_s
    return m


def _h(m: np.ndarray) -> np.ndarray:
    """2x3 affine -> 3x3 homogeneous."""
    return np.vstack([m, [0.0, 0.0, 1.0]])


def warp_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: int = 512,
    border_mode: str = "reflect",
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Align one face: similarity from ``landmarks`` (5x2, source pixels) to the FFHQ template.

    Returns ``(crop, affine, scale, border_fraction)``: the (size, size, 3) crop in the dtype
    of ``image``, the 2x3 source->crop transform, its scale (crop px per source px; > 1 means
    the face was upsampled), and the share of crop pixels that came from outside the image.
    """
    if border_mode not in _BORDER_MODES:
        raise ValueError(f"border_mode must be one of {sorted(_BORDER_MODES)}, got {border_mode!r}")
    h, w = image.shape[:2]
    m = estimate_similarity(landmarks, ffhq_template(size))
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))

    # The source region the crop reads from: the crop square mapped back, plus a margin for the
    # interpolation kernel. Clip to the image; for reflect, also extend to the far side by the
    # overflow so mirrored pixels are those the full image would give.
    minv = np.linalg.inv(_h(m))
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], dtype=np.float64)
    src_c = (minv @ corners.T)[:2].T
    margin = 2.0 + 1.0 / max(scale, 1e-6)
    lo = np.floor(src_c.min(0) - margin)
    hi = np.ceil(src_c.max(0) + margin)
    if border_mode == "reflect":
        over_lo = np.maximum(0.0, -lo)
        over_hi = np.maximum(0.0, hi - [w, h])
        lo, hi = lo - over_hi, hi + over_lo
    x0, y0 = (int(v) for v in np.clip(lo, 0, [w, h]))
    x1, y1 = (int(v) for v in np.clip(hi, 0, [w, h]))
    if x1 <= x0 or y1 <= y0:  # the crop lies wholly outside the image (cannot happen for real landmarks)
        x0, y0, x1, y1 = 0, 0, w, h
    roi = image[y0:y1, x0:x1]
    # q (roi pixel) -> p (image pixel)
    roi_to_img = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0], [0.0, 0.0, 1.0]])

    if scale < 1.0:
        rh, rw = roi.shape[:2]
        nw, nh = max(1, round(rw * scale)), max(1, round(rh * scale))
        roi = cv2.resize(roi, (nw, nh), interpolation=cv2.INTER_AREA)
        rx, ry = nw / rw, nh / rh
        # cv2.resize maps pixel centres: q_small = (q + 0.5) * r - 0.5
        small_to_roi = np.array([[1 / rx, 0.0, 0.5 / rx - 0.5], [0.0, 1 / ry, 0.5 / ry - 0.5], [0.0, 0.0, 1.0]])
        roi_to_img = roi_to_img @ small_to_roi
    total = (_h(m) @ roi_to_img)[:2]

    border = _BORDER_MODES[border_mode]
    value = CONSTANT_BORDER_VALUE if border_mode == "constant" else 0
    crop = cv2.warpAffine(np.ascontiguousarray(roi), total, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=border, borderValue=value)
    # Border share: warp an "inside" mask; the ROI touches the image edge wherever the crop
    # leaves the image, and its interior edges are beyond what the crop reads.
    inside = cv2.warpAffine(np.ones(roi.shape[:2], np.uint8), total, (size, size), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    border_fraction = 1.0 - float(inside.mean())
    return crop, m, scale, border_fraction


@dataclass
class FaceDetection:
    """One MTCNN detection in source-image pixels."""

    box: np.ndarray  # (4,) float32 x0, y0, x1, y1 (as MTCNN returns it; may reach past the image)
    landmarks: np.ndarray  # (5, 2) float32: left eye, right eye, nose, mouth left, mouth right
    score: float


@dataclass
class FaceCrop:
    """One aligned face."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    box: np.ndarray  # (4,) float x0, y0, x1, y1 in the source image
    landmarks: np.ndarray  # (5, 2) float, source-image pixels
    score: float  # MTCNN probability
    face_index: int  # position among the kept faces of its image (largest box first)
    affine: np.ndarray = field(default_factory=lambda: np.eye(2, 3))  # 2x3 source -> crop
    scale: float = 1.0  # crop px per source px; > 1: the face was upsampled (less real detail)
    border_fraction: float = 0.0  # share of crop pixels that lie outside the source image


def _check_image(i: int, img) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        desc = f"shape {img.shape}, dtype {img.dtype}" if isinstance(img, np.ndarray) else type(img).__name__
        raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {desc}")
    if min(img.shape[:2]) < 1:
        raise ValueError(f"image {i}: empty image of shape {img.shape}")
    return img


class FaceAligner:
    """MTCNN detection + FFHQ five-point alignment.

    ``align(images)`` returns one list of ``FaceCrop`` per input image (empty when no face
    passes the filters). Faces are kept when score >= ``min_score`` and the shorter side of the
    box >= ``min_size`` pixels, ordered largest box first, and cut to ``max_faces`` (None: all).
    Same-size images are detected together in batches of ``batch_size``.
    """

    def __init__(
        self,
        size: int = 512,
        min_score: float = 0.9,
        min_size: int = 32,
        device="cpu",
        max_faces: int | None = None,
        border_mode: str = "reflect",
        batch_size: int = 8,
    ):
        if size < 16:
            raise ValueError(f"size must be >= 16, got {size}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"min_score must be in [0, 1], got {min_score}")
        if max_faces is not None and max_faces < 1:
            raise ValueError(f"max_faces must be >= 1 or None, got {max_faces}")
        if border_mode not in _BORDER_MODES:
            raise ValueError(f"border_mode must be one of {sorted(_BORDER_MODES)}, got {border_mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        try:
            import torch
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise RuntimeError(f"FaceAligner needs the 'facenet-pytorch' package (MTCNN), which is missing: {e}") from None

        self.size = int(size)
        self.min_score = float(min_score)
        self.min_size = float(min_size)
        self.max_faces = max_faces
        self.border_mode = border_mode
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        # The pyramid's largest scale is set by MTCNN's min_face_size; MTCNN boxes of a face
        # vary a little between scales, so search somewhat below min_size (but >= 12, PNet's cell).
        self._detector_min = max(12, int(0.75 * min_size))
        self._mtcnn = MTCNN(
            keep_all=True,
            min_face_size=self._detector_min,
            thresholds=[0.6, 0.7, min(0.7, self.min_score)],
            select_largest=True,
            post_process=False,
            device=self.device,
        ).eval()

    # -- detection ---------------------------------------------------------------------------
    def _mtcnn_detect(self, batch: np.ndarray) -> list[list[FaceDetection]]:
        """Raw MTCNN on a (B, H, W, 3) uint8 stack of same-size images."""
        if min(batch.shape[1:3]) < self._detector_min:
            # Smaller than the smallest face MTCNN looks for (its pyramid would be empty).
            return [[] for _ in range(len(batch))]
        boxes, probs, points = self._mtcnn.detect(batch, landmarks=True)
        out: list[list[FaceDetection]] = []
        for b, p, pt in zip(boxes, probs, points):
            if b is None:
                out.append([])
                continue
            b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
            p = np.asarray(p, dtype=np.float32).reshape(-1)
            pt = np.asarray(pt, dtype=np.float32).reshape(-1, 5, 2)
            out.append([FaceDetection(box=b[k], landmarks=pt[k], score=float(p[k])) for k in range(len(b))])
        return out

    def _keep(self, dets: list[FaceDetection]) -> list[FaceDetection]:
        kept = [
            d for d in dets
            if d.score >= self.min_score and min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= self.min_size
        ]
        kept.sort(key=lambda d: -float((d.box[2] - d.box[0]) * (d.box[3] - d.box[1])))
        return kept[: self.max_faces] if self.max_faces is not None else kept

    def detect(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        """Filtered detections per image, largest box first."""
        images = [_check_image(i, img) for i, img in enumerate(images)]
        result: list[list[FaceDetection] | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape[:2], []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, dets in zip(chunk, self._mtcnn_detect(np.stack([images[i] for i in chunk]))):
                    result[i] = self._keep(dets)
        return result  # type: ignore[return-value]

    # -- alignment ---------------------------------------------------------------------------
    def crop(self, image: np.ndarray, det: FaceDetection, face_index: int = 0) -> FaceCrop:
        """Align one detection of ``image``."""
        img, m, scale, border = warp_face(image, det.landmarks, self.size, self.border_mode)
        return FaceCrop(
            image=img,
            box=np.asarray(det.box, dtype=np.float32).copy(),
            landmarks=np.asarray(det.landmarks, dtype=np.float32).copy(),
            score=float(det.score),
            face_index=face_index,
            affine=m,
            scale=scale,
            border_fraction=border,
        )

    def align(self, images: list[np.ndarray]) -> list[list[FaceCrop]]:
        """Detect, filter and align the faces of every image: one list of crops per image."""
        detections = self.detect(images)
        return [[self.crop(img, d, k) for k, d in enumerate(dets)] for img, dets in zip(images, detections)]


# -- demo photos shipped by packages --------------------------------------------------------------
def _insightface_images_dir() -> Path:
    """insightface's shipped photos, located without importing insightface (its __init__ is heavy)."""
    spec = importlib.util.find_spec("insightface")  # a top-level find_spec does not run __init__
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            d = Path(loc) / "data" / "images"
            if d.is_dir():
                return d
    try:
        for f in importlib.metadata.files("insightface") or []:
            if f.name == "t1.jpg":
                return Path(f.locate()).parent
    except importlib.metadata.PackageNotFoundError:
        pass
    raise RuntimeError("demo_photos needs the 'insightface' package (for its shipped photos), which is not installed")


def demo_photos() -> list[tuple[str, np.ndarray]]:
    """Real face photos shipped by installed packages, as (name, RGB uint8 array):
    scikit-image's astronaut (one face), insightface's t1.jpg (group photo, six faces) and
    Tom_Hanks_54745.png (112x112 face crop). insightface's mask_*.jpg are bare face masks,
    no faces, so they are left out."""
    from PIL import Image

    try:
        from skimage import data as skdata
    except ImportError:
        raise RuntimeError("demo_photos needs the 'scikit-image' package (for its astronaut photo), which is not installed") from None
    photos = [("astronaut", np.ascontiguousarray(skdata.astronaut()[..., :3]))]
    folder = _insightface_images_dir()
    for name in ("t1.jpg", "Tom_Hanks_54745.png"):
        path = folder / name
        if not path.is_file():
            raise RuntimeError(f"demo_photos: the 'insightface' package has no {path}")
        with Image.open(path) as im:
            photos.append((path.stem, np.asarray(im.convert("RGB"))))
    return photos


def contact_sheet(crops: list[np.ndarray], cols: int = 4, tile: int = 256, guides: bool = False) -> np.ndarray:
    """Tile RGB crops into one image (for eyeballing); ``guides`` marks the template points."""
    rows = max(1, -(-len(crops) // cols))
    sheet = np.full((rows * tile, cols * tile, 3), 255, np.uint8)
    for k, c in enumerate(crops):
        t = cv2.resize(c, (tile, tile), interpolation=cv2.INTER_AREA)
        if guides:
            t = t.copy()
            for x, y in ffhq_template(tile):
                cv2.drawMarker(t, (int(round(x)), int(round(y))), (0, 255, 0), cv2.MARKER_CROSS, 8, 1)
            y_eye = int(round(ffhq_template(tile)[:2, 1].mean()))
            cv2.line(t, (0, y_eye), (tile - 1, y_eye), (255, 0, 0), 1)
        r, q = divmod(k, cols)
        sheet[r * tile : (r + 1) * tile, q * tile : (q + 1) * tile] = t
    return sheet
