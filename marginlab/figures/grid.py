"""Runs of a sweep side by side: a grid of 2-D / 3-D feature panels, and their final target angles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from marginlab.figures import new_figure
from marginlab.figures.angles import BINS
from marginlab.figures.features import draw_features


@dataclass
class RunPanel:
    title: str
    features: np.ndarray | None  # N x D (D = 2 or 3), None when the run saved no features
    labels: np.ndarray
    target_deg: np.ndarray
    weights: np.ndarray | None = None
    class_ids: np.ndarray | None = None
    num_classes: int | None = None
    normalized: bool = False
    weights_are_points: bool = False


def features_grid_figure(panels: list[RunPanel], unit: bool = False, title: str = ""):
    """One panel per run (features coloured by class, weight directions); ``unit`` projects on the unit
    circle / sphere."""
    panels = [p for p in panels if p.features is not None and p.features.shape[1] in (2, 3)]
    if not panels:
        raise ValueError("no run has 2-D or 3-D features to draw")
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(3.6 * cols, 3.8 * rows, layout="constrained")
    for i, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d" if p.features.shape[1] == 3 else None)
        draw_features(ax, p.features, p.labels, p.weights, num_classes=p.num_classes, unit=unit,
                      weights_are_points=p.weights_are_points, class_ids=p.class_ids, legend=i == 0)
        ax.set_title(p.title, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def target_angles_grid_figure(panels: list[RunPanel], title: str = ""):
    """The final target-angle distribution of every run, overlaid (one outline per run)."""
    if not panels:
        raise ValueError("no run to draw")
    fig = new_figure(7.0, 4.0, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(panels) <= 10 else "turbo"]
    for i, p in enumerate(panels):
        color = cmap(i % 10) if len(panels) <= 10 else cmap(i / max(len(panels) - 1, 1))
        ax.hist(np.asarray(p.target_deg), bins=BINS, density=True, histtype="step", lw=1.5, color=color,
                label=p.title)
    ax.set_xlim(0, 180)
    ax.set_xlabel("target angle (degrees), last epoch")
    ax.set_ylabel("density")
    ax.legend(fontsize=6)
    ax.set_title(title or "target angle distribution per run", fontsize=10)
    return fig
