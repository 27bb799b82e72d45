"""Figures of a run's geometry: pure functions from arrays to a matplotlib ``Figure``, drawn headless (Agg).

No pyplot: every figure is a ``matplotlib.figure.Figure`` with its own Agg canvas, so drawing touches no
global backend state. ``save_png`` renders once and returns the RGBA pixels for TensorBoard as well.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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


#: matplotlib's own colour-blind-safe qualitative palette (Tableau's "Color Blind 10", style tableau-colorblind10)
COLORBLIND10 = (
    "#006BA4",
    "#FF800E",
    "#ABABAB",
    "#595959",
    "#5F9ED1",
    "#C85200",
    "#898989",
    "#A2C8EC",
    "#FFBC79",
    "#CFCFCF",
)


def palette(n: int) -> list:
    """``n`` colours: the colour-blind-safe ten for up to 10, a continuous map (cividis, also colour-blind safe)
    beyond, where no qualitative palette keeps that many apart."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba

    if n <= len(COLORBLIND10):
        return [to_rgba(c) for c in COLORBLIND10[:n]]
    return [colormaps["cividis"](i / max(n - 1, 1)) for i in range(n)]


#: a paper's column widths in inches (IEEE and CVPR templates: 3.5 and 7.16 / 3.25 and 6.875)
COLUMN_WIDTHS = {"single": 3.5, "double": 7.0}
FORMATS = ("png", "pdf", "svg")


@dataclass(frozen=True)
class FigureOutput:
    """How ``marginlab plot`` writes a figure: its format, resolution (png) and width (inches; None: as drawn)."""

    format: str = "png"
    dpi: int | None = None
    width: float | None = None

    def save(self, fig, path: Path) -> Path:
        """Writes ``fig`` to ``path`` with this format's suffix (atomically); returns the path written."""
        path = Path(path).with_suffix(f".{self.format}")
        if self.width is not None:  # scaled to the column, its aspect kept
            w, h = fig.get_size_inches()
            fig.set_size_inches(self.width, h * self.width / w)
        if self.format == "png" and self.dpi is None and self.width is None:
            save_png(fig, path)  # what training draws: the same pixels
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format=self.format, dpi=self.dpi or DPI)
        tmp.replace(path)
        return path


def class_colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """An RGBA colour per label, the same for a class in every panel and figure: the colour-blind-safe ten for
    up to 10 classes, tab20 for up to 20, a continuous map beyond."""
    from matplotlib import colormaps
    from matplotlib.colors import to_rgba_array

    labels = np.asarray(labels)
    if num_classes <= 10:
        return to_rgba_array(COLORBLIND10)[labels % 10]
    if num_classes <= 20:
        return colormaps["tab20"](labels % 20)
    return colormaps["turbo"](labels / max(num_classes - 1, 1))
