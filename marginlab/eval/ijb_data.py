"""IJB-B / IJB-C as InsightFace releases them, read and checked; image features embedded in a streaming pass and
cached on disk.

Layout (``<root>`` = the release folder, ``<p>`` = ``ijbb`` or ``ijbc``; eval_ijbc.py reads the same files):
``meta/<p>_face_tid_mid.txt``       one image per line: ``<image> <template id> <media id>``
``meta/<p>_name_5pts_score.txt``    the same images in the same order: ``<image> x1 y1 ... x5 y5 <faceness>``
``meta/<p>_template_pair_label.txt`` one pair per line: ``<template id> <template id> <1 same | 0 different>``
``loose_crop/<image>``              the loosely cropped photos and frames the landmarks refer to

Features: each image is aligned to the ArcFace template (``marginlab.data.face.align``), embedded in batches
(and its mirror image, with ``flip``), and written row by row into a memory-mapped ``.npy`` -- never all images in
memory. With a ``cache_dir`` the file is kept, named by a key of the weights, ``flip``, the input size and the
landmarks file, and reused by the next run with the same key; an extraction stopped midway leaves its complete rows
there (``<name>-<key>.partial.npy`` and a sidecar counting them, ``FeatureRows``) for the next run to continue.
Runs that want the same key at once take turns (``extraction_lock``): one embeds, the others wait and read its file.
A cache file is read memory-mapped, never unpickled, and checked (``read_cache``): one that is unreadable, not
float32 N x D, or holds NaN/inf is a DataError naming it to delete (it is recomputed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, get_worker_info

from marginlab.data.base import WorkerError
from marginlab.data.face import parse_image_size
from marginlab.data.face.align import (
    ARCFACE_CROP,
    FLOAT32_MAX,
    align_face,
    parse_landmark_line,
    read_image_rgb,
)
from marginlab.errors import DataError, OutputError
from marginlab.file_lock import FileLock
from marginlab.files import dumps, write_json

log = logging.getLogger(__name__)

RELEASE = "InsightFace's IJB release (IJB_release.tar: meta/, loose_crop/)"


@dataclass
class IJBMeta:
    """The checked meta files of one IJB set: per image (N) and per template pair (P)."""

    root: Path
    name: str
    images: list[str]  # N image names under loose_crop/
    lines: np.ndarray  # N: each image's line in the 5pts file (error messages)
    landmarks: np.ndarray  # N x 5 x 2 float32
    faceness: np.ndarray  # N float32
    templates: np.ndarray  # N int64
    medias: np.ndarray  # N int64
    t1: np.ndarray  # P int64
    t2: np.ndarray  # P int64
    labels: np.ndarray  # P int64 (1 same, 0 different)

    def meta_file(self, kind: str) -> Path:
        return meta_path(self.root, self.name, kind)

    @property
    def crops(self) -> Path:
        return self.root / "loose_crop"


def meta_path(root: Path, name: str, kind: str) -> Path:
    return Path(root) / "meta" / f"{name}_{kind}.txt"


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: IJB meta file not found ({what}; from {RELEASE})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the IJB meta file ({exc})") from None
    rows = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not rows:
        raise DataError(f"{path}: empty IJB meta file ({what})")
    return rows


def read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """``<image> <template id> <media id>`` per line -> (images, templates, medias, line numbers)."""
    images, ids, numbers = [], [], []
    for n, line in _lines(path, "'<image> <template id> <media id>' per line"):
        fields = line.split()
        if len(fields) != 3:
            raise DataError(
                f"{path}, line {n}: expected 3 fields '<image> <template id> <media id>', got {len(fields)}"
            )
        try:
            ids.append((int(fields[1]), int(fields[2])))
        except ValueError:
            raise DataError(
                f"{path}, line {n}: template and media ids must be integers, got {fields[1]!r} {fields[2]!r}"
            ) from None
        images.append(fields[0])
        numbers.append(n)
    pairs = np.array(ids, dtype=np.int64)
    return images, pairs[:, 0], pairs[:, 1], numbers


def read_landmarks_scores(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``<image> x1 y1 ... x5 y5 <faceness>`` per line -> (images, landmarks N x 5 x 2, faceness N, line numbers);
    numbers converted in one numpy call, a DataError naming the first bad line (``parse_landmark_line``)."""
    rows = _lines(path, "'<image> x1 y1 ... x5 y5 <faceness score>' per line")
    fields = [line.split() for _, line in rows]
    try:
        if any(len(f) != 12 for f in fields):
            raise ValueError
        numbers = np.fromiter(map(float, chain.from_iterable(f[1:] for f in fields)), np.float64).reshape(-1, 11)
        if not np.all(np.abs(numbers) <= FLOAT32_MAX):  # NaN, inf, and what overflows to inf in float32
            raise ValueError
    except ValueError:
        for n, line in rows:  # the slow path only to name the line
            parse_landmark_line(line, f"{path}, line {n}", extra=1)
        raise
    return (
        [f[0] for f in fields],
        numbers[:, :10].astype(np.float32).reshape(-1, 5, 2),
        numbers[:, 10].astype(np.float32),
        np.array([n for n, _ in rows], dtype=np.int64),
    )


def _data_line(path: Path, row: int) -> int:
    """The file line of the ``row``-th (0-based) non-empty line."""
    with open(path) as f:
        k = -1
        for n, line in enumerate(f, start=1):
            if line.strip():
                k += 1
                if k == row:
                    return n
    return n


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<template> <template> <label>`` per line (IJB-C: 15.7M lines, read by numpy's C parser) -> (t1, t2,
    label); a DataError naming the first bad line."""
    if not path.is_file():
        raise DataError(
            f"{path}: IJB meta file not found ('<template id> <template id> <label>' per line; from {RELEASE})"
        )
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        pairs = None
    if pairs is None or pairs.shape[1] != 3 or pairs.shape[0] == 0:
        for n, line in _lines(path, "'<template id> <template id> <label>' per line"):
            fields = line.split()
            if len(fields) != 3:
                raise DataError(
                    f"{path}, line {n}: expected 3 fields '<template id> <template id> <label>', got {len(fields)}"
                )
            if not all(f.lstrip("-").isdigit() for f in fields):
                raise DataError(f"{path}, line {n}: template ids and label must be integers, got {line.strip()!r}")
        raise DataError(f"{path}: not a table of '<template id> <template id> <label>' lines")
    bad = np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if bad.size:
        raise DataError(
            f"{path}, line {_data_line(path, int(bad[0]))}: label {int(pairs[bad[0], 2])} is not "
            f"allowed: 1 (same identity) or 0 (different)"
        )
    same = int(np.count_nonzero(pairs[:, 2]))
    if same in (0, len(pairs)):  # refused here, before the long embedding, not after it by evaluate_scores
        raise DataError(
            f"{path}: {same} genuine (label 1) and {len(pairs) - same} impostor (label 0) pairs; the "
            "verification ROC needs both kinds"
        )
    return pairs[:, 0], pairs[:, 1], pairs[:, 2]


def read_meta(root: str | os.PathLike, name: str) -> IJBMeta:
    """Reads and cross-checks the three meta files of ``<root>`` (nothing is embedded yet)."""
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise DataError(f"{root}: IJB folder not found (the folder of {RELEASE}, holding meta/ and loose_crop/)")
    tid_path, lmk_path = meta_path(root, name, "face_tid_mid"), meta_path(root, name, "name_5pts_score")
    pair_path = meta_path(root, name, "template_pair_label")
    for path in (tid_path, lmk_path, pair_path):  # every missing file named before the long reads
        if not path.is_file():
            raise DataError(f"{path}: IJB meta file not found (from {RELEASE})")
    images, templates, medias, tid_lines = read_tid_mid(tid_path)
    lmk_images, landmarks, faceness, lines = read_landmarks_scores(lmk_path)
    if len(lmk_images) != len(images):
        raise DataError(
            f"{lmk_path}: {len(lmk_images)} images, but {tid_path.name} has {len(images)}; the two "
            "files list the same images in the same order"
        )
    for i, (a, b) in enumerate(zip(images, lmk_images)):
        if a != b:
            raise DataError(
                f"{lmk_path}, line {lines[i]}: image {b!r}, but {tid_path.name} line {tid_lines[i]} "
                f"has {a!r}; the two files list the same images in the same order"
            )
    t1, t2, labels = read_pairs(pair_path)
    known = np.unique(templates)
    for side in (t1, t2):
        unknown = np.flatnonzero(~np.isin(side, known))
        if unknown.size:
            row = int(unknown[0])
            raise DataError(
                f"{pair_path}, line {_data_line(pair_path, row)}: template {int(side[row])} is not in "
                f"{tid_path.name} (no image of it); {unknown.size} pair(s) name unknown templates"
            )
    return IJBMeta(root, name, images, lines, landmarks, faceness, templates, medias, t1, t2, labels)


class AlignedCrops(Dataset):
    """Image ``i`` of an IJB set aligned to the ArcFace template, fitted to ``image_size``: uint8 3 x H x W RGB."""

    def __init__(self, meta: IJBMeta, image_size=ARCFACE_CROP):
        self.meta = meta
        self.size = parse_image_size(image_size, "image_size")
        self.where = str(meta.meta_file("name_5pts_score"))

    def __len__(self) -> int:
        return len(self.meta.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            return self.crop(index)
        except DataError as exc:
            if get_worker_info() is None:
                raise
            raise WorkerError(str(exc)) from None  # one line in the main process, not the worker's traceback

    def crop(self, index: int) -> torch.Tensor:
        from PIL import Image

        from marginlab.data.face import fit_face, to_uint8_chw

        where = f"{self.where}, line {int(self.meta.lines[index])}"
        image = read_image_rgb(self.meta.crops / self.meta.images[index], where)
        try:
            crop = align_face(image, self.meta.landmarks[index], ARCFACE_CROP)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        if self.size != ARCFACE_CROP:  # 112x96: the SphereFace crop inside it; else a resize (fit_face)
            return to_uint8_chw(fit_face(Image.fromarray(crop), self.size))
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).contiguous()


@torch.no_grad()
def raw_features(backbone, images: torch.Tensor, flip: bool, device) -> np.ndarray:
    """The backbone's output (not normalised: its norm is a quality score) on uint8 crops, plus that of the
    mirrored crops with ``flip`` (eval_ijbc.py: ``img_feats[:, :D] + img_feats[:, D:]``)."""
    from marginlab.data.face import normalize_face

    x = normalize_face(images.to(device, non_blocking=True))  # (x / 255 - 0.5) / 0.5, as forward_db
    feats = backbone(x).float()
    if flip:
        feats = feats + backbone(x.flip(-1)).float()
    return feats.cpu().numpy()


def weights_key(backbone) -> str:
    """A SHA-1 of the backbone's class and every tensor of its state: the same weights give the same key."""
    digest = hashlib.sha1(type(backbone).__qualname__.encode())
    for key, tensor in sorted(backbone.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(meta: IJBMeta, backbone, image_size, flip: bool) -> tuple[str, dict]:
    lmk = meta.meta_file("name_5pts_score")
    stat = lmk.stat()
    about = {
        "set": meta.name,
        "weights_sha1": weights_key(backbone),
        "flip": bool(flip),
        "image_size": list(parse_image_size(image_size, "image_size")),
        "landmarks": {"path": str(lmk.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
    }
    return hashlib.sha1(dumps(about, sort_keys=True).encode()).hexdigest()[:16], about


@contextlib.contextmanager
def extraction_lock(path: Path, name: str):
    """Holds the ``FileLock`` of ``<name>-<key>.lock`` while the features of that key are looked up and embedded:
    two runs with the same key would otherwise write one partial file at once. A second run waits for the first."""
    lock = FileLock(path)
    try:
        if not lock.acquire():
            log.info("another run is embedding these %s features (%s); waiting for it", name, path)
            lock.acquire(block=True)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create the IJB feature lock ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()


CHECKPOINT_SECONDS = 30.0  # a resumable extraction flushes its rows and records them at most this often


def partial_paths(out: Path) -> tuple[Path, Path]:
    """``<name>.npy`` -> (``<name>.partial.npy``: the rows embedded so far, ``<name>.partial.json``: how many
    leading rows of it are complete)."""
    stem = out.name[: -len(".npy")] if out.name.endswith(".npy") else out.name
    return out.with_name(f"{stem}.partial.npy"), out.with_name(f"{stem}.partial.json")


class FeatureRows:
    """The N x D float32 ``.npy`` memmap an extraction writes, created at the first batch (D is the backbone's).
    With a ``sidecar``, ``checkpoint()`` flushes the rows to disk and only then records their count in it
    (atomically), and ``resume()`` picks the file up again."""

    def __init__(self, path: Path, num_images: int, sidecar: Path | None = None):
        self.path, self.num_images, self.sidecar = path, num_images, sidecar
        self.matrix, self.done = None, 0

    def write(self, feats: np.ndarray) -> None:
        if self.matrix is None:
            self.matrix = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=np.float32, shape=(self.num_images, feats.shape[1])
            )
            self.checkpoint()  # a sidecar from the start: a partial file without one is a broken one
        self.matrix[self.done : self.done + len(feats)] = feats
        self.done += len(feats)

    def checkpoint(self) -> None:
        if self.matrix is None or self.sidecar is None:
            return
        self.matrix.flush()  # the rows on disk first; the sidecar never claims more
        record = {"rows": self.done, "images": self.num_images, "dim": int(self.matrix.shape[1]), "dtype": "float32"}
        write_json(self.sidecar, record)

    def resume(self, name: str) -> None:
        """Continues a partial file that fits (same image count, float32, its sidecar readable); discards one that
        does not with one log line, to start from row 0."""
        if not self.path.exists() and not self.sidecar.exists():
            return
        try:
            self.matrix, self.done = self._read_partial()
        except ValueError as exc:
            log.warning("discarding %s (%s); embedding %s features from the start", self.path, exc, name)
            self.discard()
            return
        log.info("resuming %s features at row %d of %d", name, self.done, self.num_images)

    def _read_partial(self) -> tuple[np.ndarray, int]:
        try:
            record = json.loads(self.sidecar.read_text())
        except FileNotFoundError:
            raise ValueError(f"no sidecar {self.sidecar.name}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable sidecar {self.sidecar.name}: {exc}") from None
        rows = record.get("rows") if isinstance(record, dict) else None
        if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= self.num_images:
            raise ValueError(f"sidecar {self.sidecar.name} records rows={rows!r}, allowed 0..{self.num_images}")
        if record.get("images") != self.num_images:
            raise ValueError(f"sidecar records {record.get('images')!r} images, the set has {self.num_images}")
        try:  # read-only first: numpy's "r+" would quietly zero-extend a truncated file
            matrix = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"unreadable partial file: {exc}") from None
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != self.num_images:
            raise ValueError(f"{matrix.dtype} {matrix.shape}, expected float32 ({self.num_images}, D)")
        if record.get("dim") != matrix.shape[1]:
            raise ValueError(f"sidecar records dim {record.get('dim')!r}, the file has {matrix.shape[1]}")
        return np.load(self.path, mmap_mode="r+", allow_pickle=False), rows

    def discard(self) -> None:
        self.matrix = None
        self.path.unlink(missing_ok=True)
        if self.sidecar is not None:
            self.sidecar.unlink(missing_ok=True)

    def close(self) -> None:
        self.matrix.flush()
        self.matrix = None


def extract_features(
    meta: IJBMeta,
    backbone,
    image_size,
    out: Path,
    flip: bool = True,
    batch_size: int = 128,
    num_workers: int = 0,
    device=None,
    progress: bool | None = None,
    resume: bool = False,
) -> Path:
    """Embeds every image into ``out`` (float32 N x D ``.npy``), batch by batch through a staged file that is
    renamed into place only when complete. With ``resume`` that file is ``partial_paths(out)``: its complete rows
    are recorded every ``CHECKPOINT_SECONDS`` (and when the run fails), and a run stopped midway is continued by
    the next from its recorded row."""
    from tqdm import tqdm

    from marginlab.files import staged

    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    dataset = AlignedCrops(meta, image_size)
    show = sys.stderr.isatty() if progress is None else progress
    was_training = backbone.training
    backbone.eval()
    try:
        with staged(out) as tmp:  # tmp: the file without resume (nothing is created under that name otherwise)
            path, sidecar = partial_paths(out) if resume else (tmp, None)
            rows = FeatureRows(path, len(dataset), sidecar)
            if resume:
                rows.resume(meta.name)
            todo = dataset if rows.done == 0 else Subset(dataset, range(rows.done, len(dataset)))
            loader = DataLoader(todo, batch_size=batch_size, num_workers=num_workers, shuffle=False)
            last = time.monotonic()
            try:
                for images in tqdm(loader, desc=f"{meta.name} features", unit="batch", disable=not show):
                    rows.write(raw_features(backbone, images, flip, device))
                    if resume and time.monotonic() - last >= CHECKPOINT_SECONDS:
                        rows.checkpoint()
                        last = time.monotonic()
            except BaseException:
                if resume:  # the rows embedded so far kept for the next run; the last checkpoint stands otherwise
                    with contextlib.suppress(Exception):
                        rows.checkpoint()
                raise
            rows.close()
            os.replace(rows.path, out)
            if rows.sidecar is not None:
                rows.sidecar.unlink(missing_ok=True)
    finally:
        backbone.train(was_training)
    return out


def image_features_cached(
    meta: IJBMeta,
    backbone,
    image_size,
    flip: bool = True,
    batch_size: int = 128,
    num_workers: int = 0,
    device=None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, Path | None]:
    """(image features N x D, memory-mapped, and the cache file or None). With ``cache_dir``: the cached
    features of these weights / flip / input size when present, else embedded and kept there."""
    if cache_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="marginlab-ijb-") as tmp:
            path = extract_features(
                meta, backbone, image_size, Path(tmp) / "features.npy", flip, batch_size, num_workers, device, progress
            )
            return np.array(np.load(path, mmap_mode="r", allow_pickle=False)), None
    key, about = cache_key(meta, backbone, image_size, flip)
    folder = Path(os.path.expanduser(str(cache_dir)))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot create the IJB feature cache ({exc.strerror or exc}); give "
            f"verification.{meta.name}.cache_dir=<a writable folder>"
        ) from None
    path = folder / f"{meta.name}-{key}.npy"
    with extraction_lock(path.with_suffix(".lock"), meta.name):  # a run waiting here then finds the file
        cached = path.is_file()
        if not cached:
            extract_features(
                meta, backbone, image_size, path, flip, batch_size, num_workers, device, progress, resume=True
            )  # a run stopped midway leaves <name>-<key>.partial.npy (+ .partial.json) for the next to continue
            write_json(path.with_suffix(".json"), about)
    return read_cache(path, meta, check_finite=cached), path


NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file (numpy.lib.format)
CHECK_ROWS = 16384  # rows of a cache checked for NaN/inf at a time (IJB-C: 470k x 512 float32, 1 GB)


def read_cache(path: Path, meta: IJBMeta, check_finite: bool = True) -> np.ndarray:
    """The cached features (memory-mapped, never unpickled): float32, one row per image, finite with
    ``check_finite``; a DataError naming the file to delete otherwise (a truncated, foreign or damaged file)."""
    fix = "delete the file: the features are recomputed on the next run"
    try:
        with open(path, "rb") as f:
            if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise ValueError("not a .npy file")
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: unreadable IJB feature cache ({exc}); {fix}") from None
    n = len(meta.images)
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] != n:
        raise DataError(
            f"{path}: the IJB feature cache holds {features.dtype} {features.shape}, expected float32 ({n}, D), "
            f"one row per image; {fix}"
        )
    for lo in range(0, n if check_finite else 0, CHECK_ROWS):
        bad = np.flatnonzero(~np.isfinite(features[lo : lo + CHECK_ROWS]).all(1))
        if bad.size:
            row = lo + int(bad[0])
            raise DataError(f"{path}: the IJB feature cache holds NaN/inf (row {row}, {meta.images[row]}); {fix}")
    return features
