"""ROC curve of a verification set (TAR against FAR, log-scaled FAR), as in face-verification papers, drawn from
the exact ROC (sklearn ``roc_curve`` over every distinct distance), not from the accuracy protocol's 0.01 grid."""

from __future__ import annotations

import numpy as np

from marginlab.figures import new_figure

FAR_FLOOR = 1e-4  # the left end of the FAR axis, unless the ROC has smaller non-zero FARs


def roc_figure(
    fpr: np.ndarray,
    tpr: np.ndarray,
    name: str,
    accuracy: float,
    auc: float,
    epoch: int | None = None,
    note: str | None = None,
):
    """The curve through (fpr, tpr). FAR = 0 has no place on a log axis: those points are drawn at its left end,
    so a perfect ROC ((0, 0), (0, 1), (1, 1)) shows as TAR 1 at every FAR rather than as nothing."""
    fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
    positive = fpr[fpr > 0]
    floor = min(FAR_FLOOR, float(positive.min())) if positive.size else FAR_FLOOR
    fig = new_figure(4.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.maximum(fpr, floor), tpr, lw=1.5)
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    when = "" if epoch is None else f", epoch {epoch}"
    ax.set_title(f"{name}: acc {accuracy:.4f}, AUC {auc:.4f}{when}", fontsize=9)
    if note:
        ax.text(0.98, 0.02, note, transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="tab:red")
    ax.grid(True, which="both", alpha=0.3)
    fig.subplots_adjust(left=0.15, bottom=0.13, right=0.96, top=0.9)
    return fig


def verification_roc_figure(result: dict, name: str, epoch: int | None = None):
    """The figure of one set's ``evaluate`` result: its exact ROC (``exact_fpr`` / ``exact_tpr``; the grid's
    fold-averaged ``fpr`` / ``tpr`` only for a result without them), noting a grid-limited accuracy."""
    exact = "exact_fpr" in result
    fpr, tpr = (result["exact_fpr"], result["exact_tpr"]) if exact else (result["fpr"], result["tpr"])
    note = "accuracy limited by the 0.01 threshold grid" if result.get("warnings") else None
    return roc_figure(np.asarray(fpr), np.asarray(tpr), name, result["accuracy"], result["auc"], epoch, note)
