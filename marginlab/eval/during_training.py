"""Verification sets run from the trainer (every evaluated epoch) and from ``marginlab eval``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: what goes into metrics.jsonl / TensorBoard per set: <name>/<key>
SCALARS = {
    "acc": "accuracy",
    "acc_std": "accuracy_std",
    "threshold": "threshold",
    "tar_at_far": "tar_at_far",
    "auc": "auc",
    "eer": "eer",
}


def run_verifiers(
    verifiers: dict,
    backbone,
    image_size,
    device,
    *,
    figures_dir: Path | None = None,
    writer=None,
    step: int = 0,
    epoch: int | None = None,
) -> tuple[dict[str, float], dict[str, dict]]:
    """Embeds and scores each set; returns the flat scalars (``lfw/acc``, ...) and each set's full result."""
    scalars, results = {}, {}
    for name, target in verifiers.items():
        result = target.run(backbone, image_size=image_size, device=device)
        results[name] = result
        scalars.update({f"{name}/{short}": float(result[key]) for short, key in SCALARS.items() if key in result})
        scalars.update({f"{name}/{short}": float(value) for short, value in result.get("scalars", {}).items()})
        if figures_dir is not None:
            draw_roc(result, name, figures_dir / f"roc_{name}.png", writer, step, epoch)
    return scalars, results


def draw_roc(result: dict, name: str, path: Path, writer=None, step: int = 0, epoch: int | None = None) -> None:
    """The ROC figure as a PNG (and a TensorBoard image); a figure never fails a run."""
    try:
        from marginlab.figures import save_png
        from marginlab.figures.ijb_roc import ijb_roc_figure
        from marginlab.figures.roc import verification_roc_figure

        figure = ijb_roc_figure if "tar_at_fars" in result else verification_roc_figure  # IJB-B/C: no accuracy
        rgba = save_png(figure(result, name, epoch), path)
        if writer is not None:
            writer.add_image(f"verification/{name}_roc", rgba[..., :3], step, dataformats="HWC")
    except Exception as exc:  # noqa: BLE001 - figures are optional
        log.warning("ROC figure for %s not drawn: %s: %s", name, type(exc).__name__, exc)


def jsonable(result: dict) -> dict:
    """numpy arrays and scalars -> lists and floats."""
    out = {}
    for key, value in result.items():
        if isinstance(value, np.ndarray):
            out[key] = value.tolist()
        elif isinstance(value, np.generic):
            out[key] = value.item()
        else:
            out[key] = value
    return out
