"""Runs of a sweep side by side: a grid of 2-D / 3-D feature panels, and their final target angles."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marginlab.figures import new_figure, palette
from marginlab.figures.angles import angle_bins, legend_outside, range_note, wrapped
from marginlab.figures.features import class_legend, draw_features

#: font sizes (points) readable at the saved size (figures.DPI): the figure title, panel titles and axis labels, ticks
TITLE_SIZE, PANEL_SIZE, TICK_SIZE = 13, 10, 8

#: a sweep directory's time stamp (``2026-12-02_08-31-51``, ``-1`` when taken): not what the sweep is
TIME_STAMP = re.compile(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?")


def sweep_name(root: Path) -> str:
    """``outputs/sweeps/<name>/<date_time>`` -> ``<name>``; any other directory: its own name."""
    root = Path(root).resolve()
    return root.parent.name if TIME_STAMP.fullmatch(root.name) and root.parent.name else root.name


def sweep_title(name: str, varying: list[str], what: str, runs: int) -> str:
    """``sweep margins: features of 4 runs, varying head, head.m``."""
    return f"sweep {name}: {what} of {runs} run{'s' if runs != 1 else ''}" + (
        f", varying {', '.join(varying)}" if varying else ""
    )


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
    fig = new_figure(4.0 * cols, 4.4 * rows + (0.4 if title else 0.0), layout="constrained")
    for i, p in enumerate(panels):
        dim = p.features.shape[1]
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d" if dim == 3 else None)
        draw_features(
            ax,
            p.features,
            p.labels,
            p.weights,
            num_classes=p.num_classes,
            unit=unit,
            weights_are_points=p.weights_are_points,
            class_ids=p.class_ids,
        )
        ax.set_title(p.title, fontsize=PANEL_SIZE)
        name = "unit feature" if unit else "feature"
        ax.set_xlabel(f"{name} dim 1", fontsize=PANEL_SIZE)
        ax.set_ylabel(f"{name} dim 2", fontsize=PANEL_SIZE)
        if dim == 3:
            ax.set_zlabel(f"{name} dim 3", fontsize=PANEL_SIZE)
        ax.tick_params(labelsize=TICK_SIZE)
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE)
    classes = max((p.num_classes or 0 for p in panels), default=0) or None
    labels = np.concatenate([np.asarray(p.labels) for p in panels])
    class_legend(fig, labels, classes, loc="outside right upper")  # the constrained layout makes room for it
    return fig


def target_angles_grid_figure(panels: list[RunPanel], title: str = ""):
    """The final target-angle distribution of every run, overlaid (one outline per run), on the data's range."""
    if not panels:
        raise ValueError("no run to draw")
    fig = new_figure(8.0, 4.0, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    bins = angle_bins([p.target_deg for p in panels])
    for p, color in zip(panels, palette(len(panels))):
        ax.hist(np.asarray(p.target_deg), bins=bins, density=True, histtype="step", lw=1.5, color=color, label=p.title)
    ax.set_xlim(bins[0], bins[-1])
    note = range_note(bins, [p.target_deg for p in panels])
    ax.set_xlabel("target angle (degrees), last epoch" + note, fontsize=PANEL_SIZE)
    ax.set_ylabel("density (per degree)", fontsize=PANEL_SIZE)
    ax.tick_params(labelsize=TICK_SIZE)
    legend_outside(ax, TICK_SIZE)
    ax.set_title(wrapped(title or "target angle distribution per run", 60), fontsize=TITLE_SIZE)
    return fig
