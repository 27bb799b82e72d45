"""TensorBoard's embedding projector for the probe's last sample: features, labels, whether each was
classified correctly, and (where the inputs are images) sprites of the first samples."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

MAX_THUMBNAILS, THUMBNAIL_SIZE = 2048, 32  # embedding projector sprites (uint8, at most 6 MB)


@torch.no_grad()
def thumbnails(images: Tensor) -> Tensor:
    """N x 3 x h x w uint8 on the CPU, h, w <= THUMBNAIL_SIZE, each image stretched to 0..255: sprites for
    the embedding projector."""
    x = images.float()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    h, w = x.shape[-2:]
    if max(h, w) > THUMBNAIL_SIZE:
        scale = THUMBNAIL_SIZE / max(h, w)
        x = F.interpolate(
            x,
            size=(max(1, round(h * scale)), max(1, round(w * scale))),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12) * 255
    return x.round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous().cpu()


def write_projector(
    writer, sample: dict, step: int, thumbs: Tensor | None = None, thumb_labels: Tensor | None = None
) -> None:
    """``sample`` (features, labels, correct) to the projector; with ``thumbs`` (sprites of the first
    samples, whose labels ``thumb_labels`` must still match) only those samples, with their sprites.
    Never fails the run: a problem is logged as a warning."""
    try:
        feats, labels, correct = (sample[k] for k in ("features", "labels", "correct"))
        sprites = None
        if thumbs is not None and torch.equal(labels[: thumbs.shape[0]], thumb_labels):
            n = thumbs.shape[0]  # the samples the sprites show (the same first samples each epoch)
            feats, labels, correct, sprites = feats[:n], labels[:n], correct[:n], thumbs.float() / 255
        meta = [[int(y), "yes" if ok else "no"] for y, ok in zip(labels, correct)]
        writer.add_embedding(
            feats,
            metadata=meta,
            metadata_header=["label", "correct"],
            label_img=sprites,
            global_step=step,
            tag="val_features",
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic never fails the run
        log.warning("embedding projector not written: %s: %s", type(exc).__name__, exc)
