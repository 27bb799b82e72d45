"""Five-point face alignment to the ArcFace 112x112 template (a similarity transform, then a warp).

The template is SphereFace's 96x112 five points (eyes, nose tip, mouth corners) shifted by +8 px in x, as in
InsightFace's ``recognition/arcface_torch/eval_ijbc.py`` (``src[:, 0] += 8.0``) and ``insightface.utils.face_align``
(``arcface_dst``). The transform is scikit-image's least-squares similarity (Umeyama 1991) from the image's
landmarks to the template; the warp is OpenCV's bilinear ``warpAffine`` with a black border -- the same two calls
as InsightFace, so a crop made here equals theirs pixel for pixel.

Landmarks files (``marginlab align``, IJB ``*_name_5pts_score.txt``): one image per line, the image's path then
ten numbers ``x1 y1 x2 y2 ... x5 y5`` (left eye, right eye, nose tip, left and right mouth corners, in pixels of
the image), then ``extra`` more numbers (IJB: one faceness score). Every number must be finite in float32 (what
the transform computes in), and every point on the image (``check_in_frame``): landmarks off the image give a
black or meaningless crop, which would be embedded and scored as a face.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from marginlab.errors import ConfigError, DataError

#: SphereFace's 96x112 template (Wen et al. 2016 / Liu et al. 2017, ``face_align_demo.m``), (x, y) per point
SPHEREFACE_TEMPLATE = np.array(
    [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
    dtype=np.float32,
)
#: ArcFace's 112x112 template = SphereFace's + 8 px in x (eval_ijbc.py ``src[:, 0] += 8.0``; face_align.arcface_dst)
ARCFACE_TEMPLATE = SPHEREFACE_TEMPLATE + np.array([8.0, 0.0], dtype=np.float32)
#: the crop size (height, width) the ArcFace template is drawn for
ARCFACE_CROP = (112, 112)
#: how far a landmark may lie off the image, as a fraction of its width (x) or height (y): a detector places the
#: points of a face cut by the border a little outside; farther out the crop is mostly (or all) black border
FRAME_MARGIN = 0.1
#: the largest float32: a larger landmark number overflows to inf in the transform
FLOAT32_MAX = float(np.finfo(np.float32).max)

INSTALL_HINT = "face alignment needs scikit-image and opencv: pip install 'marginlab[align]'"


def opencv():
    try:
        import cv2
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return cv2


def similarity_matrix(landmarks: np.ndarray, template: np.ndarray = ARCFACE_TEMPLATE) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, translation) taking ``landmarks`` (5 x 2) closest to
    ``template`` in least squares (Umeyama 1991, scikit-image ``SimilarityTransform``); ValueError when the
    points are degenerate (e.g. all equal)."""
    try:
        from skimage.transform import SimilarityTransform
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    src = np.asarray(landmarks, dtype=np.float32).reshape(-1, 2)  # float32 as InsightFace: the same matrix, to the bit
    dst = np.asarray(template, dtype=np.float32).reshape(-1, 2)
    if src.shape != dst.shape:
        raise ValueError(f"{len(src)} landmarks for a {len(dst)}-point template")
    if hasattr(SimilarityTransform, "from_estimate"):  # scikit-image >= 0.26 (estimate() is deprecated there)
        tform = SimilarityTransform.from_estimate(src, dst)
        ok = bool(tform)
    else:
        tform = SimilarityTransform()
        ok = tform.estimate(src, dst)
    if not ok or not np.all(np.isfinite(tform.params)):
        raise ValueError("the landmarks are degenerate (no similarity transform fits them)")
    return tform.params[:2, :]


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray,
    size: tuple[int, int] = ARCFACE_CROP,
    template: np.ndarray = ARCFACE_TEMPLATE,
) -> np.ndarray:
    """``image`` (H x W x C uint8, any channel order, kept) warped so its 5 ``landmarks`` (x, y) fall on
    ``template``; returns a ``size`` = (height, width) crop, black outside the image (InsightFace ``norm_crop``)."""
    cv2 = opencv()
    check_in_frame(landmarks, image.shape)
    matrix = similarity_matrix(landmarks, template)
    height, width = size
    return cv2.warpAffine(image, matrix, (width, height), borderValue=0.0)


def check_in_frame(landmarks: np.ndarray, shape: tuple[int, ...]) -> None:
    """ValueError naming the first point off an image of ``shape`` (H x W [x C]): each (x, y) must lie in
    [-m_x, W + m_x] x [-m_y, H + m_y], with margins ``FRAME_MARGIN`` of W and H; NaN/inf is off every image."""
    height, width = shape[:2]
    mx, my = FRAME_MARGIN * width, FRAME_MARGIN * height
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 2)
    inside = (
        (points[:, 0] >= -mx) & (points[:, 0] <= width + mx) & (points[:, 1] >= -my) & (points[:, 1] <= height + my)
    )
    if not inside.all():
        k = int(np.argmin(inside))
        x, y = points[k]
        raise ValueError(
            f"landmark {k + 1} (x={x:g}, y={y:g}) is off the {width}x{height} image: allowed x in "
            f"[{-mx:g}, {width + mx:g}], y in [{-my:g}, {height + my:g}] (the image and {FRAME_MARGIN:.0%} of "
            f"its size around it)"
        )


def read_image_rgb(path: str | os.PathLike, where: str) -> np.ndarray:
    """An image file as H x W x 3 uint8 RGB, read with OpenCV as InsightFace does (``cv2.imread``, BGR -> RGB);
    a DataError naming ``where`` when it cannot be read."""
    cv2 = opencv()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        reason = "no such file" if not Path(path).is_file() else "not a readable image"
        raise DataError(f"{where}: cannot read image {path} ({reason})")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def parse_landmark_line(line: str, where: str, extra: int = 0) -> tuple[str, np.ndarray, list[float]]:
    """``<image> x1 y1 ... x5 y5 [extra numbers]`` -> (image, landmarks 5 x 2 float32, extras); a DataError
    naming ``where`` (file and line) for a wrong field count or a field that is not a number."""
    fields = line.split()
    want = 1 + 10 + extra
    if len(fields) != want:
        extras = f" then {extra} more number{'s' if extra > 1 else ''}" if extra else ""
        raise DataError(
            f"{where}: expected {want} fields (an image path, 10 landmark numbers x1 y1 ... x5 y5"
            f"{extras}), got {len(fields)}"
        )
    try:
        numbers = [float(v) for v in fields[1:]]
    except ValueError:
        bad = next(v for v in fields[1:] if not _is_number(v))
        raise DataError(f"{where}: {bad!r} is not a number") from None
    if not all(np.isfinite(numbers)) or max(map(abs, numbers)) > FLOAT32_MAX:
        raise DataError(f"{where}: the numbers must be finite (within float32), got {' '.join(fields[1:])}")
    return fields[0], np.array(numbers[:10], dtype=np.float32).reshape(5, 2), numbers[10:]


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_landmarks_file(path: str | os.PathLike, extra: int = 0) -> list[tuple[int, str, np.ndarray, list[float]]]:
    """Every non-empty line of a landmarks file as (line number, image, landmarks 5 x 2, extras)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: landmarks file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the landmarks file ({exc})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append((n, *parse_landmark_line(line, f"{path}, line {n}", extra)))
    if not rows:
        raise DataError(f"{path}: no landmark line (expected '<image> x1 y1 ... x5 y5' per line)")
    return rows
