"""ROC curve of a verification set (TAR against FAR, log-scaled FAR), as in face-verification papers."""

from __future__ import annotations

import numpy as np

from marginlab.figures import new_figure


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, name: str, accuracy: float, auc: float, epoch: int | None = None):
    fig = new_figure(4.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    keep = fpr > 0  # log axis: FAR = 0 has no place on it
    ax.plot(fpr[keep], tpr[keep], lw=1.5)
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    when = "" if epoch is None else f", epoch {epoch}"
    ax.set_title(f"{name}: acc {accuracy:.4f}, AUC {auc:.4f}{when}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.subplots_adjust(left=0.15, bottom=0.13, right=0.96, top=0.9)
    return fig
