"""ROC of an IJB-B/C 1:1 evaluation: TAR against FAR from 1e-6 to 1e-1 (log axis), as eval_ijbc.py plots it."""

from __future__ import annotations

import numpy as np

from marginlab.figures import new_figure


def ijb_roc_figure(result: dict, name: str, epoch: int | None = None):
    """``result``: ``marginlab.eval.ijb.evaluate_scores``'s dict (``fpr``, ``tpr``, ``tar_at_fars``, ``auc``);
    axes as eval_ijbc.py (``xlim([1e-6, 0.1])``, ``ylim([0.3, 1.0])``), the TAR@FAR points marked."""
    fpr, tpr = np.asarray(result["fpr"], dtype=float), np.asarray(result["tpr"], dtype=float)
    fig = new_figure(4.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    keep = fpr > 0  # FAR = 0 has no place on a log axis
    ax.plot(fpr[keep], tpr[keep], lw=1.5)
    fars = [float(k) for k in result["tar_at_fars"]]
    ax.plot(fars, list(result["tar_at_fars"].values()), "o", ms=3)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1e-1)
    ax.set_ylim(0.3, 1.0)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    when = "" if epoch is None else f", epoch {epoch}"
    far = f"{result['far_target']:.0e}"
    ax.set_title(f"{name}: TAR@FAR={far} {result['tar_at_far']:.4f}, AUC {result['auc']:.4f}{when}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.subplots_adjust(left=0.15, bottom=0.13, right=0.96, top=0.9)
    return fig
