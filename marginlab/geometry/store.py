"""The saved geometry of a run: ``geometry/epoch_XXX.npz``, one per evaluated epoch (bounded size), and
its I/O. numpy only: ``marginlab plot`` reads it without the training-time probe.

Keys (``GeometryProbe._epoch_data`` writes them): ``epoch``, ``step``, ``labels`` (N), ``target_deg``,
``other_deg`` (N, degrees), ``feature_norm`` (N), ``correct`` (N), ``weight_norm`` (at most
``MAX_SAVED_WEIGHT_NORMS``), ``num_classes``, ``normalized``, ``weights_are_points``, ``head`` (class
name); for embeddings of at most ``MAX_SAVED_DIM`` dimensions also ``features`` (N x D), ``weights``
(class prototypes) and ``class_ids`` (the classes those rows are). ``load_epoch`` never unpickles and checks the
fields the figures read (``check_epoch``): a bad file is one DataError naming it and what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from marginlab.errors import DataError

GEOMETRY_DIR = "geometry"
MAX_SAVED_DIM = 3  # features and class weights go into the npz only for embeddings that can be drawn
MAX_SAVED_CLASSES = 1024  # class prototypes saved per epoch (2-D / 3-D)
MAX_SAVED_WEIGHT_NORMS = 4096


def epoch_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / GEOMETRY_DIR / f"epoch_{epoch:03d}.npz"


def list_epochs(run_dir: Path) -> list[Path]:
    """The run's saved epochs, in epoch order."""
    paths = Path(run_dir).glob(f"{GEOMETRY_DIR}/epoch_*.npz")
    numbered = [(int(m.group(1)), p) for p in paths if (m := re.fullmatch(r"epoch_(\d+)\.npz", p.name))]
    return [p for _, p in sorted(numbered)]


ZIP_MAGIC = b"PK\x03\x04"  # an npz is a zip archive of .npy files (numpy.savez)
FIX = "delete it (the other epochs are still drawn) or re-run the training"
#: fields holding one number (or string) each
SCALARS = {"epoch": int, "step": int, "num_classes": int, "normalized": bool, "weights_are_points": bool, "head": str}
#: fields holding one number per sampled feature (N, the length of ``labels``)
PER_SAMPLE = ("target_deg", "other_deg", "feature_norm", "correct")


def load_epoch(path: Path) -> dict:
    """One saved epoch, its fields checked (``check_epoch``); a DataError naming the file when it cannot be read
    (truncated, corrupt, not an npz, pickled objects: never loaded) or a field is not what the probe writes."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); {FIX}") from None
    if head != ZIP_MAGIC:
        raise DataError(f"{path} cannot be read: it is not an npz file (a zip of .npy arrays, numpy.savez); {FIX}")
    data, key = {}, None
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                value = z[key]
                data[key] = value.item() if value.ndim == 0 else value
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # numpy's advice to unpickle: never for a file we only draw
            raise DataError(f"{path} cannot be read: field {key!r} holds pickled Python objects; {FIX}") from None
        raise DataError(f"{path} cannot be read, it is not a complete npz file (ValueError: {exc}); {FIX}") from None
    except Exception as exc:  # noqa: BLE001 - whatever fails while parsing the file, the file is at fault
        raise DataError(
            f"{path} cannot be read, it is not a complete npz file ({type(exc).__name__}: {exc}); {FIX}"
        ) from None
    check_epoch(path, data)
    return data


def check_epoch(path: Path, data: dict) -> None:
    """The fields the figures read have the probe's shapes (store.py's schema): ``epoch`` and ``labels`` (N
    integers), ``target_deg`` and the other per-sample fields N numbers, ``features`` N x D, ``weights`` K x D
    with ``class_ids`` K; a DataError naming the file, the field and what was expected."""

    def refuse(key: str, expected: str) -> DataError:
        value = data[key]
        got = f"shape {value.shape} {value.dtype}" if isinstance(value, np.ndarray) else f"{value!r}"
        return DataError(f"{path}: field {key!r} is {got}, expected {expected}; {FIX}")

    for key in ("epoch", "labels", "target_deg"):
        if key not in data:
            raise DataError(f"{path}: no field {key!r} (a saved epoch holds epoch, labels, target_deg, ...); {FIX}")
    for key, kind in SCALARS.items():
        if key in data and not (isinstance(data[key], kind) or (kind is bool and isinstance(data[key], int))):
            raise refuse(key, f"one {kind.__name__}")
    labels = data["labels"]
    if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise refuse("labels", "N integer class labels (1-D)")
    n = len(labels)
    for key in PER_SAMPLE:
        value = data.get(key)
        if key in data and not (isinstance(value, np.ndarray) and value.shape == (n,) and value.dtype.kind in "biuf"):
            raise refuse(key, f"({n},) numbers, one per label")
    features = data.get("features")
    if "features" in data and not (
        isinstance(features, np.ndarray)
        and features.ndim == 2
        and features.shape[0] == n
        and features.dtype.kind in "iuf"
    ):
        raise refuse("features", f"({n}, D) numbers, one row per label")
    dim = features.shape[1] if "features" in data else None
    weights = data.get("weights")
    if "weights" in data and not (
        isinstance(weights, np.ndarray) and weights.ndim == 2 and weights.shape[1] == (dim or weights.shape[1])
    ):
        raise refuse("weights", f"(K, {dim or 'D'}) class weights")
    if "class_ids" in data and not (
        isinstance(data["class_ids"], np.ndarray)
        and data["class_ids"].ndim == 1
        and data["class_ids"].dtype.kind in "iu"
        and (weights is None or len(data["class_ids"]) == len(weights))
    ):
        raise refuse("class_ids", f"({'K' if weights is None else len(weights)},) integers, one per weight row")


def save_epoch(path: Path, data: dict) -> None:
    """Writes one epoch atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)


def has_features(data: dict) -> bool:
    """Whether a saved epoch holds drawable (2-D / 3-D) features."""
    return "features" in data and data["features"].ndim == 2 and data["features"].shape[1] in (2, 3)


def latest_with_features(run_dir: Path) -> dict | None:
    """The last saved epoch when it holds drawable (2-D / 3-D) features, else None."""
    paths = list_epochs(run_dir)
    data = load_epoch(paths[-1]) if paths else None
    return data if data is not None and has_features(data) else None
