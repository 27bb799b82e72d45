"""Figures of a run's geometry: pure functions from arrays to a matplotlib ``Figure``, drawn headless (Agg).

No pyplot: every figure is a ``matplotlib.figure.Figure`` with its own Agg canvas, so drawing touches no
global backend state. ``save_png`` renders once and returns the RGBA pixels for TensorBoard as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DPI = 80


def new_figure(width: float, height: float, layout: str | None = None):
    """A Figure on its own Agg canvas (headless; pyplot is never imported).

    No layout engine by default (constrained layout doubles the drawing time of a per-epoch figure):
    callers place their axes with ``subplots_adjust``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def render(fig) -> np.ndarray:
    """The figure's pixels, H x W x 4 uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def save_png(fig, path: str | os.PathLike) -> np.ndarray:
    """Renders ``fig`` once, writes it as a PNG (atomically) and returns its RGBA pixels (H x W x 4 uint8)."""
    from PIL import Image

    rgba = render(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(rgba).save(tmp, format="PNG")
    tmp.replace(path)
    return rgba


def class_colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """An RGBA colour per label: tab10 / tab20 for up to 10 / 20 classes, a continuous map beyond."""
    from matplotlib import colormaps

    labels = np.asarray(labels)
    if num_classes <= 10:
        return colormaps["tab10"](labels % 10)
    if num_classes <= 20:
        return colormaps["tab20"](labels % 20)
    return colormaps["turbo"](labels / max(num_classes - 1, 1))
