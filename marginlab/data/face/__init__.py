"""Face data: aligned crops from MXNet RecordIO (InsightFace releases) or an ImageFolder tree.

Shared here: image-size parsing, decoding (PIL), fitting a crop to the network's input size, the
face normalisation ``(x / 255 - 0.5) / 0.5`` and the Dataset base that turns a decode failure into a
DataError (or, with ``skip_corrupt``, a logged, counted substitution).
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from marginlab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: Input sizes (height, width) of the aligned-crop conventions: InsightFace/ArcFace and SphereFace/CosFace.
ARCFACE_SIZE = (112, 112)
SPHEREFACE_SIZE = (112, 96)


def parse_image_size(value, key: str = "dataset.image_size") -> tuple[int, int]:
    """``112`` -> (112, 112); ``[112, 96]`` -> (112, 96) as (height, width)."""
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and not isinstance(value, (str, bytes))):
        items = list(value)
        if len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
            return int(items[0]), int(items[1])
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return int(value), int(value)
    raise ConfigError(f"{key}={value!r} is not allowed: give an integer >= 1 (square) or [height, width]")


def decode_image(data: bytes | str | os.PathLike, where: str) -> Image.Image:
    """Decodes fully (``convert`` forces every pixel) to RGB; a DataError naming ``where`` when it cannot.

    16-bit grayscale (PIL modes ``I;16*``, and ``I`` for a PNG: how Pillow < 11 opens one) keeps the high byte of
    each pixel, ``v >> 8`` (0..65535 -> 0..255), as PIL reads 16-bit RGB and OpenCV any 16-bit image (``align``,
    IJB); PIL's own ``convert`` would clip it to 255, an all-white face. Other 32-bit pixels (``I``, e.g. a TIFF)
    have no known range: refused."""
    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        with Image.open(source) as img:
            if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
                high = (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
                return Image.fromarray(high).convert("RGB")
            if img.mode == "I":
                raise DataError(
                    f"{where}: 32-bit integer pixels (a {img.format} of PIL mode 'I') have no known range; "
                    f"give an 8- or 16-bit image"
                )
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot decode the image ({type(exc).__name__}: {exc})") from None


def fit_face(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Brings an aligned crop to (height, width).

    Same size: untouched. Same height, wider (112x112 -> 112x96): centre crop of the width, which is exact
    for aligned crops because InsightFace's 112x112 landmark template is SphereFace's 96x112 one shifted by
    8 px in x (insightface ``face_align.arcface_dst`` vs sphereface ``face_align_demo.m``). Otherwise a
    bilinear resize.
    """
    h, w = size
    if img.height == h and img.width == w:
        return img
    if img.height == h and img.width > w:
        left = (img.width - w) // 2
        return img.crop((left, 0, left + w, h))
    return img.resize((w, h), Image.BILINEAR)


def to_uint8_chw(img: Image.Image) -> Tensor:
    """PIL RGB -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def normalize_face(x: Tensor) -> Tensor:
    """uint8 (or 0..255 float) -> float32 ``(x / 255 - 0.5) / 0.5`` in [-1, 1] (InsightFace's normalisation)."""
    return (x.float() / 255.0 - 0.5) / 0.5


def class_count(labels: np.ndarray, counted: int, requested: int | None, describe, blame: str) -> int:
    """The number of classes the head gets. With ``requested`` (``dataset.num_classes``): that number, and a
    DataError naming the first record (``describe(i)``) whose label is not below it. Without: ``counted`` (what
    the data says), unless it is far above the labels in use -- more than twice the distinct labels and more
    than 1000 classes without an image, the mark of a corrupt label or header -- then a DataError that names
    ``blame`` (the record the count came from)."""
    if requested is not None:
        over = np.flatnonzero(labels >= requested)
        if over.size:
            i = int(over[0])
            raise DataError(
                f"{describe(i)}: label {int(labels[i])} is not below dataset.num_classes={requested} "
                f"({over.size} such records). To fix: raise dataset.num_classes, or repair the labels"
            )
        return int(requested)
    distinct = int(np.unique(labels).size)
    empty = counted - distinct
    if counted > 2 * distinct and empty > 1000:
        raise DataError(
            f"{blame}: that makes {counted:,} classes, but the {labels.size:,} images use only "
            f"{distinct:,} distinct labels ({empty:,} classes would have no image; a corrupt label?). "
            f"To fix: repair or remove that record, or set dataset.num_classes={counted} if the "
            f"classes really are that many"
        )
    return counted


class FaceImageDataset(Dataset):
    """Base of the face training sets: ``(image float32 3xHxW in [-1, 1], label int64)``.

    Subclasses implement ``__len__``, ``raw(i) -> (bytes or path, label)`` and ``describe(i)`` (the file and
    record named in error messages). ``train=True`` flips horizontally with probability 0.5 (torch's RNG,
    which DataLoader seeds per worker). A sample that cannot be read raises DataError; with
    ``skip_corrupt=True`` it is replaced by the next readable sample, counted in ``skipped`` (per process:
    each DataLoader worker counts its own) and logged.
    """

    def __init__(self, image_size: tuple[int, int], train: bool, skip_corrupt: bool = False):
        self.image_size = image_size
        self.train = train
        self.skip_corrupt = bool(skip_corrupt)
        self.skipped = 0

    def raw(self, index: int) -> tuple[bytes | str, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError

    def load_uint8(self, index: int) -> tuple[Tensor, int]:
        """The decoded, fitted image as uint8 (3, H, W), unflipped, and its label."""
        data, label = self.raw(index)
        return to_uint8_chw(fit_face(decode_image(data, self.describe(index)), self.image_size)), label

    def load(self, index: int) -> tuple[Tensor, int]:
        x, label = self.load_uint8(index)
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return normalize_face(x), label

    def first_readable(self, index: int, load):
        """``load(j)`` for the first j = index, index + 1, ... (mod len) that does not raise DataError: only
        ``index`` itself unless ``skip_corrupt``, where each failure is counted and logged."""
        n = len(self)
        attempts = min(n, 64)
        for step in range(attempts):
            j = (index + step) % n
            try:
                return load(j)
            except DataError as exc:
                if not self.skip_corrupt:
                    raise
                self.note_skipped(exc)
        raise DataError(
            f"{self.describe(index)}: this sample and the next {attempts - 1} cannot be read "
            f"(skip_corrupt gave up); the data set looks broken"
        )

    def note_skipped(self, exc: Exception) -> None:
        self.skipped += 1
        log.warning("skip_corrupt: skipped %s (%d skipped so far in process %d)", exc, self.skipped, os.getpid())

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, label = self.first_readable(index, self.load)
        return x, torch.tensor(label, dtype=torch.int64)


from marginlab.data.face.casia import CasiaData  # noqa: E402  (re-export; casia imports the helpers above)

__all__ = [
    "ARCFACE_SIZE",
    "SPHEREFACE_SIZE",
    "CasiaData",
    "FaceImageDataset",
    "class_count",
    "decode_image",
    "fit_face",
    "normalize_face",
    "parse_image_size",
    "to_uint8_chw",
]
