"""Distribution of the target angle theta_y at the first and last epoch on one plot (as in ArcFace),
with the nearest non-target angle for reference; and the helpers every angle histogram shares: the axis is
ranged to the data (a run whose angles all lie within 10 degrees is not drawn on 0-180), the legend sits
outside the axes."""

from __future__ import annotations

import numpy as np

from marginlab.figures import new_figure, palette

BINS = np.linspace(0.0, 180.0, 91)  # 2-degree bins: the full range, for callers that need fixed bins
NUM_BINS = 60  # over the data's own range


def angle_bins(arrays: list[np.ndarray]) -> np.ndarray:
    """``NUM_BINS`` bins over the finite values of ``arrays`` (degrees), padded by 5% of their span (at least
    1 degree) and kept within [0, 180]. When a few stragglers stretch the span (the last 1% of the angles
    reach three times as far as the other 99%), the bins cover the central 99% (``clipped``)."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    if not len(values):
        return BINS
    lo, hi = float(values.min()), float(values.max())
    central = np.percentile(values, [0.5, 99.5])
    if hi - lo > 3 * (central[1] - central[0]):
        lo, hi = float(central[0]), float(central[1])
    pad = max(0.05 * (hi - lo), 1.0)
    return np.linspace(max(0.0, lo - pad), min(180.0, hi + pad), NUM_BINS + 1)


def range_note(bins: np.ndarray, arrays: list[np.ndarray]) -> str:
    """`` (axis: the central 99% of the angles)`` when ``bins`` leave some angles out, else nothing."""
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] or [np.zeros(0)])
    values = values[np.isfinite(values)]
    outside = bool(len(values)) and bool(((values < bins[0]) | (values > bins[-1])).any())
    return " (axis: the central 99% of the angles)" if outside else ""


def wrapped(title: str, width: int = 70) -> str:
    """A title on as many lines as it needs: a figure's width holds about ``width`` characters of it."""
    import textwrap

    return textwrap.fill(title, width)


def legend_outside(ax, fontsize: float) -> None:
    """The legend to the right of the axes (a constrained layout makes room), never over the histograms."""
    ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def target_angle_figure(epochs: list[dict], title: str = ""):
    """``epochs``: dicts with ``epoch``, ``target_deg`` and optionally ``other_deg`` (degrees, 1-D arrays),
    typically the first and the last epoch. Target angles are filled histograms, nearest non-target
    angles dashed outlines, one colour per epoch."""
    fig = new_figure(7.0, 3.6, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    colors = palette(len(epochs))
    bins = angle_bins([d[k] for d in epochs for k in ("target_deg", "other_deg") if d.get(k) is not None])
    for data, color in zip(epochs, colors):
        ax.hist(
            np.asarray(data["target_deg"]),
            bins=bins,
            density=True,
            color=color,
            alpha=0.45,
            label=f"epoch {int(data['epoch'])}: target angle",
        )
        if data.get("other_deg") is not None:
            ax.hist(
                np.asarray(data["other_deg"]),
                bins=bins,
                density=True,
                histtype="step",
                ls="--",
                color=color,
                label=f"epoch {int(data['epoch'])}: nearest non-target",
            )
    ax.set_xlim(bins[0], bins[-1])
    shown = [d[k] for d in epochs for k in ("target_deg", "other_deg") if d.get(k) is not None]
    ax.set_xlabel("angle to the class weight (degrees)" + range_note(bins, shown))
    ax.set_ylabel("density (per degree)")
    legend_outside(ax, 7)
    ax.set_title(wrapped(title or "target angle distribution"), fontsize=10)
    return fig
