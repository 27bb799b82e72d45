"""Figures from a run's saved geometry (geometry/store.py): what the training-time probe draws after each
epoch and what ``marginlab plot`` re-draws from disk. Pure: saved data in, a matplotlib Figure out."""

from __future__ import annotations

from pathlib import Path

from marginlab.geometry.store import list_epochs, load_epoch

FIGURES_DIR = "figures"


def features_epoch_figure(data: dict, title: str | None = None):
    """The 2-D / 3-D features of one saved epoch with its class weights."""
    from marginlab.figures import features

    head = data.get("head", "")
    return features.features_figure(
        data["features"],
        data["labels"],
        data.get("weights"),
        normalized=bool(data.get("normalized", False)),
        num_classes=int(data.get("num_classes", 0)) or None,
        class_ids=data.get("class_ids"),
        weights_are_points=bool(data.get("weights_are_points", False)),
        title=title if title is not None else f"{head}, epoch {int(data['epoch'])}".lstrip(", "),
    )


def final_features_title(data: dict) -> str:
    return f"{data['head']}, final (epoch {data['epoch']})"


def target_angles_figure(run_dir: Path, title: str = ""):
    """First and last saved epoch of a run on one plot; None when nothing was saved."""
    from marginlab.figures import angles

    paths = list_epochs(run_dir)
    if not paths:
        return None
    chosen = [paths[0]] if len(paths) == 1 else [paths[0], paths[-1]]
    return angles.target_angle_figure([load_epoch(p) for p in chosen], title=title)
