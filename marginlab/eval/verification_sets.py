"""Verification pair sets: InsightFace ``.bin`` files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) and raw LFW
(an image folder plus the official ``pairs.txt``), decoded with PIL -- no MXNet.

``.bin``: a pickle of ``(bins, issame_list)`` -- 2N encoded images, pair i = images 2i and 2i+1
(InsightFace ``eval/verification.py`` ``load_bin``, read with ``pickle.load(f, encoding='bytes')``).
``pairs.txt`` (LFW, Huang et al. 2007): a header ``<folds> <n>``, then per fold ``n`` matched lines
``name i j`` and ``n`` mismatched lines ``name1 i name2 j``; image ``<root>/<name>/<name>_<iiii>.jpg``.
A pairs file for your own data (``verification=[pairs]``): one pair a line, ``path1 path2 label`` separated by
spaces or tabs, label 1 (same identity) or 0, paths relative to the image root (or absolute, without spaces);
blank lines and lines starting with ``#`` are skipped. Its pairs are cut into 10 contiguous folds in file order
(InsightFace's protocol: mix the two kinds through the file); it must hold both kinds (TAR@FAR, AUC and EER are
undefined without either). A file whose first line does not have 3 fields is read as LFW's ``pairs.txt``.
Raw LFW images are 250x250 and unaligned: give aligned crops (the same alignment as the training data)
or accuracy will be poor; any other size is resized.

Images are kept as uint8 (2N x 3 x H x W): float32 would take 4x the memory (1.8 GB for LFW at 112x112);
``float_images()`` gives the normalised ``(x / 255 - 0.5) / 0.5`` tensor, and ``embed_pairs`` accepts either.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from marginlab.data.face import decode_image, fit_face, normalize_face, parse_image_size, to_uint8_chw
from marginlab.errors import ConfigError, DataError
from marginlab.eval.verification import check_far_target, check_nfolds, check_nfolds_fit, embed_pairs, evaluate


@dataclass
class VerificationSet:
    """Pairs (images[2i], images[2i+1]) with ground truth issame[i]; ``folds`` from pairs.txt (10 for .bin)."""

    name: str
    images: Tensor  # uint8, 2N x 3 x H x W
    issame: np.ndarray  # bool, N
    path: str
    folds: int = 10

    def __len__(self) -> int:
        return len(self.issame)

    def float_images(self) -> Tensor:
        return normalize_face(self.images)


# ---- decoding -------------------------------------------------------------------------------------------
def _decode_all(sources: list, where, size: tuple[int, int], workers: int | None = None) -> Tensor:
    """Decodes every source (bytes or path) to a uint8 2N x 3 x H x W tensor; PIL releases the GIL, so
    threads help. The first failure (lowest index) is raised."""
    h, w = size
    out = torch.empty((len(sources), 3, h, w), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = to_uint8_chw(fit_face(decode_image(sources[i], where(i)), size))

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(sources) < 64:
        for i in range(len(sources)):
            one(i)
        return out
    with ThreadPoolExecutor(workers) as pool:
        errors = [f.exception() for f in [pool.submit(one, i) for i in range(len(sources))]]
    for err in errors:
        if err is not None:
            raise err
    return out


class _BinUnpickler(pickle.Unpickler):
    """Refuses every global except numpy's array reconstruction: a .bin holds only bytes, lists and bools."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytearray"),
        ("__builtin__", "bytearray"),
        ("_codecs", "encode"),
    }  # Python 3 writes bytes as _codecs.encode(str, 'latin1') under protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a verification .bin holds only encoded images and booleans"
        )


def load_bin(path: str | os.PathLike, image_size=112, name: str | None = None) -> VerificationSet:
    """An InsightFace ``.bin`` set; images fitted to ``image_size`` (int or [height, width])."""
    path = Path(os.path.expanduser(str(path)))
    size = parse_image_size(image_size, "image_size")
    sources, issame = read_bin(path)
    images = _decode_all(sources, lambda i: f"{path}: image {i} (pair {i // 2})", size)
    return VerificationSet(name or path.stem, images, issame, str(path))


def read_bin(path: Path) -> tuple[list[bytes], np.ndarray]:
    """The encoded images (2N, pair i = images 2i and 2i+1) and issame (N bool) of a ``.bin``, not decoded."""
    try:
        with open(path, "rb") as f:
            obj = _BinUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(
            f"{path}: verification set not found (InsightFace's {path.name}, e.g. from the "
            f"faces_webface_112x112 or faces_emore release)"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise DataError(f"{path}: not a readable verification .bin ({type(exc).__name__}: {exc})") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame_list = obj
    try:
        issame = np.asarray(issame_list).astype(bool).ravel()
        bins = list(bins)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable (bins, issame_list) ({exc})") from None
    if len(bins) != 2 * len(issame) or len(issame) == 0:
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs; a .bin holds 2 images per pair")
    sources = []
    for i, b in enumerate(bins):
        if isinstance(b, np.ndarray):
            b = b.tobytes()
        if not isinstance(b, (bytes, bytearray)):
            raise DataError(f"{path}: image {i} is a {type(b).__name__}, not encoded image bytes")
        sources.append(bytes(b))
    return sources, issame


# ---- raw LFW --------------------------------------------------------------------------------------------
def read_pairs(pairs_path: str | os.PathLike, root: str | os.PathLike, ext: str = "jpg"):
    """Parses pairs.txt into (image paths 2N, issame N, folds); every line checked, every image must exist."""
    pairs_path, root = Path(pairs_path), Path(root)
    try:
        lines = pairs_path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{pairs_path}: cannot read the pairs file ({exc})") from None
    if not lines or not lines[0].split():
        raise DataError(f"{pairs_path}, line 1: expected a header '<folds> <pairs per class per fold>', e.g. '10 300'")
    head = lines[0].split()
    try:
        folds, per = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
        if len(head) > 2 or folds < 1 or per < 1:
            raise ValueError
    except ValueError:
        raise DataError(
            f"{pairs_path}, line 1: expected a header '<folds> <pairs per class per fold>', "
            f"e.g. '10 300', got {lines[0]!r}"
        ) from None
    body = [(n, line) for n, line in enumerate(lines[1:], start=2) if line.strip()]
    expected = 2 * folds * per
    if len(body) != expected:
        raise DataError(
            f"{pairs_path}: the header promises {folds} folds x {per} matched + {per} mismatched "
            f"= {expected} pair lines, found {len(body)}"
        )
    paths, issame = [], []
    for k, (n, line) in enumerate(body):
        fields = line.split()
        matched = (k % (2 * per)) < per
        want = 3 if matched else 4
        if len(fields) != want:
            kind = "matched 'name i j'" if matched else "mismatched 'name1 i name2 j'"
            raise DataError(f"{pairs_path}, line {n}: expected {want} fields ({kind}), got {len(fields)}: {line!r}")
        names = (fields[0], fields[1], fields[0], fields[2]) if matched else tuple(fields)
        for person, num in (names[:2], names[2:]):
            try:
                number = int(num)
            except ValueError:
                raise DataError(f"{pairs_path}, line {n}: image number {num!r} is not an integer") from None
            image = root / person / f"{person}_{number:04d}.{ext}"
            if not image.is_file():
                raise DataError(f"{pairs_path}, line {n}: image {image} does not exist")
            paths.append(str(image))
        issame.append(matched)
    return paths, np.array(issame, dtype=bool), folds


# ---- your own pairs ---------------------------------------------------------------------------------------
PATH_PAIRS_FOLDS = 10  # InsightFace's 10-fold protocol
LABELS = {"1": True, "0": False}


def _content_lines(pairs_path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line that is not blank nor a ``#`` comment."""
    try:
        lines = pairs_path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{pairs_path}: pairs file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{pairs_path}: cannot read the pairs file ({exc})") from None
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip() and not line.lstrip().startswith("#")]


def is_lfw_pairs(pairs_path: Path) -> bool:
    """LFW's ``pairs.txt`` (its first line a header ``<folds> <n>``) unless that line has the 3 fields of a
    ``path1 path2 label`` line."""
    body = _content_lines(pairs_path)
    return bool(body) and len(body[0][1].split()) != 3


def read_path_pairs(pairs_path: str | os.PathLike, root: str | os.PathLike):
    """Parses a ``path1 path2 label`` pairs file into (image paths 2N, issame N, folds); every line checked,
    every image must exist."""
    pairs_path, root = Path(pairs_path), Path(root)
    body = _content_lines(pairs_path)
    if not body:
        raise DataError(
            f"{pairs_path}: no pair in the pairs file (one 'path1 path2 label' a line, label 1 or 0; "
            f"or LFW's pairs.txt)"
        )
    paths, issame = [], []
    for n, line in body:
        fields = line.split()
        if len(fields) != 3:
            raise DataError(
                f"{pairs_path}, line {n}: expected 3 fields 'path1 path2 label', got {len(fields)}: {line!r}"
            )
        if fields[2] not in LABELS:
            raise DataError(f"{pairs_path}, line {n}: label {fields[2]!r} is not allowed: 1 (same identity) or 0")
        for field_ in fields[:2]:
            image = root / os.path.expanduser(field_)  # an absolute path stays as it is
            if not image.is_file():
                raise DataError(f"{pairs_path}, line {n}: image {image} does not exist")
            paths.append(str(image))
        issame.append(LABELS[fields[2]])
    same = sum(issame)
    if same in (0, len(issame)):  # TAR@FAR read 1.0 with no impostor pair: FAR is undefined without one
        raise DataError(
            f"{pairs_path}: {same} same-identity (label 1) and {len(issame) - same} different-identity (label 0) "
            f"pairs; verification needs both kinds (FAR, TAR, AUC and EER are undefined without either)"
        )
    return paths, np.array(issame, dtype=bool), PATH_PAIRS_FOLDS


def load_lfw_folder(
    root: str | os.PathLike, pairs: str | os.PathLike | None = None, image_size=112, name: str = "lfw", ext: str = "jpg"
) -> VerificationSet:
    """Images under ``root`` with a pairs file ``pairs`` (default ``root/pairs.txt``): LFW's ``pairs.txt``
    (``root/<name>/<name>_<nnnn>.<ext>``) or a ``path1 path2 label`` file (paths relative to ``root``)."""
    root = Path(os.path.expanduser(str(root)))
    size = parse_image_size(image_size, "image_size")
    pairs_path = Path(os.path.expanduser(str(pairs))) if pairs else root / "pairs.txt"
    if not root.is_dir():
        raise DataError(f"{root}: image folder of the verification set {name!r} not found")
    if is_lfw_pairs(pairs_path):
        paths, issame, folds = read_pairs(pairs_path, root, ext)
    else:
        paths, issame, folds = read_path_pairs(pairs_path, root)
    images = _decode_all(paths, lambda i: paths[i], size)
    return VerificationSet(name, images, issame, str(root), folds)


def load_verification_set(
    path: str | os.PathLike, image_size=112, name: str | None = None, pairs: str | os.PathLike | None = None
) -> VerificationSet:
    """A ``.bin`` file, or an image directory with a pairs file (``pairs``, default ``<dir>/pairs.txt``)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return load_lfw_folder(p, pairs, image_size, name or p.name)
    return load_bin(p, image_size, name)


def read_issame(path: str | os.PathLike, pairs: str | os.PathLike | None = None) -> np.ndarray:
    """The ground truth (N bool) of the set ``load_verification_set`` would load, no image decoded: for checking
    settings against the pairs before anything is embedded."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        return read_bin(p)[1]
    pairs_path = Path(os.path.expanduser(str(pairs))) if pairs else p / "pairs.txt"
    if is_lfw_pairs(pairs_path):
        return read_pairs(pairs_path, p)[1]
    return read_path_pairs(pairs_path, p)[1]


@dataclass
class VerificationTarget:
    """What ``configs/verification/*.yaml`` builds: a set to load lazily and how to embed it.

    ``target.load(image_size)`` reads (and caches) the set at the backbone's input size;
    ``target.run(backbone, image_size, device)`` embeds it and returns ``evaluate``'s dict plus ``name``.
    ``nfolds`` (None: the set's own) and ``far_target`` are checked when the target is built (a ConfigError naming
    the key): a given ``nfolds`` against the set's pairs too, read then (labels only), so a bad one fails at
    start-up, not after a training epoch; ``run`` checks again before embedding (the fields may be reassigned).
    """

    name: str
    path: str
    flip: bool = True
    batch_size: int = 256
    pairs: str | None = None
    nfolds: int | None = None  # default: the set's own (10 for .bin, pairs.txt's header for raw LFW)
    far_target: float = 1e-3
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(
                f"verification.{self.name}.batch_size={self.batch_size!r} is not allowed: it must be an integer >= 1"
            )
        self.check_settings()
        if self.nfolds is not None:  # the pairs of either kind bound it: read the labels now, not after an epoch
            check_nfolds_fit(self.nfolds, read_issame(self.path, self.pairs), f"verification.{self.name}.nfolds")

    def check_settings(self) -> None:
        """``nfolds`` (an integer >= 1, or None: the set's own) and ``far_target`` (in (0, 1)), or a ConfigError."""
        self.nfolds = check_nfolds(self.nfolds, f"verification.{self.name}.nfolds", optional=True)
        self.far_target = check_far_target(self.far_target, f"verification.{self.name}.far_target")

    def load(self, image_size=112) -> VerificationSet:
        size = parse_image_size(image_size, "image_size")
        if size not in self._cache:
            self._cache[size] = load_verification_set(self.path, size, self.name, self.pairs)
        return self._cache[size]

    def run(self, backbone, image_size=112, device=None) -> dict:
        self.check_settings()
        data = self.load(image_size)
        if self.nfolds is not None:
            check_nfolds_fit(self.nfolds, data.issame, f"verification.{self.name}.nfolds")
        emb1, emb2 = embed_pairs(backbone, data.images, self.batch_size, self.flip, device)
        # nfolds None: the set's own folds (10 for a .bin, pairs.txt's header), bounded by the pair count only
        nfolds = data.folds if self.nfolds is None else self.nfolds
        result = evaluate(emb1, emb2, data.issame, nfolds, self.far_target, check_kinds=self.nfolds is not None)
        result["name"] = self.name
        return result
