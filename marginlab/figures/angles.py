"""Distribution of the target angle theta_y at the first and last epoch on one plot (as in ArcFace),
with the nearest non-target angle for reference."""

from __future__ import annotations

import numpy as np

from marginlab.figures import new_figure

BINS = np.linspace(0.0, 180.0, 91)  # 2-degree bins


def target_angle_figure(epochs: list[dict], title: str = ""):
    """``epochs``: dicts with ``epoch``, ``target_deg`` and optionally ``other_deg`` (degrees, 1-D arrays),
    typically the first and the last epoch. Target angles are filled histograms, nearest non-target
    angles dashed outlines, one colour per epoch."""
    fig = new_figure(6.0, 3.6, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:red", "tab:green", "tab:purple"]
    for data, color in zip(epochs, colors * len(epochs)):
        ax.hist(
            np.asarray(data["target_deg"]),
            bins=BINS,
            density=True,
            color=color,
            alpha=0.45,
            label=f"epoch {int(data['epoch'])}: target angle",
        )
        if data.get("other_deg") is not None:
            ax.hist(
                np.asarray(data["other_deg"]),
                bins=BINS,
                density=True,
                histtype="step",
                ls="--",
                color=color,
                label=f"epoch {int(data['epoch'])}: nearest non-target",
            )
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle (degrees)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title or "target angle distribution", fontsize=10)
    return fig
