"""The saved geometry of a run: ``geometry/epoch_XXX.npz``, one per evaluated epoch (bounded size), and
its I/O. numpy only: ``marginlab plot`` reads it without the training-time probe.

Keys (``GeometryProbe._epoch_data`` writes them): ``epoch``, ``step``, ``labels`` (N), ``target_deg``,
``other_deg`` (N, degrees), ``feature_norm`` (N), ``correct`` (N), ``weight_norm`` (at most
``MAX_SAVED_WEIGHT_NORMS``), ``num_classes``, ``normalized``, ``weights_are_points``, ``head`` (class
name); for embeddings of at most ``MAX_SAVED_DIM`` dimensions also ``features`` (N x D), ``weights``
(class prototypes) and ``class_ids`` (the classes those rows are).
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


def load_epoch(path: Path) -> dict:
    """One saved epoch; a DataError naming the file when it cannot be read (truncated, corrupt, not an npz)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    except Exception as exc:  # noqa: BLE001 - whatever fails while parsing the file, the file is at fault
        raise DataError(
            f"{path} cannot be read, it is not a complete npz file ({type(exc).__name__}: {exc}); "
            "delete it (the other epochs are still drawn) or re-run the training"
        ) from None


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
