"""The geometry probe: a bounded validation sample per evaluated epoch -> histograms, scalars, npz, figures.

``evaluate`` hands each batch's features, the target and nearest non-target cosines (read off the evaluation
logits by the head's ``cosine_of_logits``, else from its pure ``cosine``: heads/probe.py), labels and predictions
to ``collect`` until ``max_samples`` are held.
``end_epoch`` then logs the histograms (feature norm of correctly / wrongly classified samples, target
angle, nearest non-target angle, realised angular margin, class-weight norms), returns the epoch's
scalars (pairwise class-weight angles, intra-class spread, inter-class angles of class means), writes
``geometry/epoch_XXX.npz`` (store.py) and, for 2-D / 3-D embeddings, draws
``figures/features_epoch_XXX.png`` on the background thread (figure_pool.py, render.py). ``end_run``
draws ``figures/features_final.png`` and ``figures/target_angles.png`` and writes the TensorBoard
embedding projector (projector.py). A figure never fails a run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from marginlab.geometry.figure_pool import FigurePool
from marginlab.geometry.projector import MAX_THUMBNAILS, thumbnails, write_projector
from marginlab.geometry.render import features_epoch_figure, final_features_title, target_angles_figure
from marginlab.geometry.stats import (
    class_angle_stats,
    class_weights,
    is_normalized,
    sample_angles,
    weight_angle_stats,
    weights_are_points,
)
from marginlab.geometry.store import (
    MAX_SAVED_CLASSES,
    MAX_SAVED_DIM,
    MAX_SAVED_WEIGHT_NORMS,
    epoch_path,
    has_features,
    latest_with_features,
    list_epochs,
    save_epoch,
)

MAX_PAIRWISE_CLASSES = 2048  # pairwise weight angles: a fixed subset of classes above this


class GeometryProbe:
    """Collects a bounded validation sample during ``evaluate`` and turns it into the epoch's geometry."""

    def __init__(self, run_dir: Path, max_samples: int = 2048, writer=None, figures: bool = True):
        self.run_dir = Path(run_dir)
        self.max_samples = int(max_samples)
        self.writer = writer
        self.figures = bool(figures)
        self.last_sample: dict | None = None  # the last epoch's sample, for the embedding projector
        self.thumbs: Tensor | None = None  # sprites of the first samples, taken once (the val order is fixed)
        self.thumb_labels: Tensor | None = None
        self.pool = FigurePool(self.run_dir, writer)
        self._reset()

    @classmethod
    def from_config(cls, cfg, run_dir: Path, run_log) -> GeometryProbe:
        return cls(run_dir, max_samples=cfg.logger.probe_max_samples, writer=run_log.writer, figures=cfg.logger.figures)

    @property
    def figure_seconds(self) -> float:
        """Drawing time, spent on the background thread."""
        return self.pool.seconds

    def _reset(self) -> None:
        self.n = 0
        self.parts: dict[str, list[Tensor]] = {
            k: [] for k in ("features", "labels", "target", "other", "pred", "thumbs")
        }
        self.seconds = 0.0

    @property
    def wants_more(self) -> bool:
        return self.n < self.max_samples

    # ---- during evaluate ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(
        self,
        features: Tensor,
        cos: Tensor | None,
        labels: Tensor,
        predictions: Tensor,
        images: Tensor | None = None,
        nearest: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Keeps up to ``max_samples`` samples: features, target / nearest non-target angles, predictions.

        ``nearest``: ``stats.target_and_nearest_other(cos, labels)`` when the caller has it already (``cos`` may
        then be None)."""
        start = time.perf_counter()
        keep = min(labels.numel(), self.max_samples - self.n)
        if keep <= 0:
            return
        labels = labels[:keep]
        if nearest is not None:
            nearest = (nearest[0][:keep], nearest[1][:keep])
        target, other = sample_angles(None if cos is None else cos[:keep], labels, nearest)
        for key, value in (
            ("features", features[:keep].float()),
            ("labels", labels),
            ("target", target),
            ("other", other),
            ("pred", predictions[:keep]),
        ):
            self.parts[key].append(value.detach().cpu())
        if (
            images is not None
            and self.writer is not None
            and self.thumbs is None
            and images.dim() == 4
            and self.n < MAX_THUMBNAILS
        ):
            self.parts["thumbs"].append(thumbnails(images[: min(keep, MAX_THUMBNAILS - self.n)]))
        self.n += keep
        self.seconds += time.perf_counter() - start

    # ---- at the end of an evaluated epoch ------------------------------------------------------------
    @torch.no_grad()
    def end_epoch(self, epoch: int, step: int, head) -> dict[str, float]:
        """Histograms to TensorBoard, npz, per-epoch figure; returns the epoch's geometry scalars."""
        self.pool.log_finished(wait=False)
        if self.n == 0:
            self._reset()
            return {}
        start = time.perf_counter()
        feats = torch.cat(self.parts["features"])
        labels = torch.cat(self.parts["labels"])
        target, other = torch.cat(self.parts["target"]), torch.cat(self.parts["other"])
        correct = torch.cat(self.parts["pred"]) == labels
        norms = feats.norm(dim=1)
        margin = other - target  # the realised angular margin: > 0 when the sample is classified by angle
        weight_norms = head.weight.detach().float().norm(dim=1).cpu()

        scalars = {"angle/margin_deg": margin.mean().item()}
        if correct.any():
            scalars["feature_norm/correct_mean"] = norms[correct].mean().item()
        if (~correct).any():
            scalars["feature_norm/wrong_mean"] = norms[~correct].mean().item()
        scalars.update(weight_angle_stats(head, MAX_PAIRWISE_CLASSES))
        scalars.update(class_angle_stats(feats, labels, MAX_PAIRWISE_CLASSES))

        if self.writer is not None:
            hists = {
                "feature_norm_correct": norms[correct],
                "feature_norm_wrong": norms[~correct],
                "target_deg": target,
                "nearest_other_deg": other,
                "margin_deg": margin,
                "weight_norm": weight_norms,
            }
            for tag, values in hists.items():
                values = values[torch.isfinite(values)]  # a diverged run must not break the histogram
                if values.numel():
                    self.writer.add_histogram(f"geometry/{tag}", values.numpy(), step)

        data = self._epoch_data(epoch, step, head, feats, labels, target, other, norms, correct, weight_norms)
        save_epoch(epoch_path(self.run_dir, epoch), data)
        if self.parts["thumbs"]:
            self.thumbs = torch.cat(self.parts["thumbs"])
            self.thumb_labels = labels[: self.thumbs.shape[0]]
        self.last_sample = {"features": feats, "labels": labels, "correct": correct}
        if self.figures and has_features(data):
            self.pool.submit(
                f"features_epoch_{epoch:03d}.png", "figures/features", step, lambda: features_epoch_figure(data)
            )
        scalars["probe/seconds"] = self.seconds + time.perf_counter() - start
        self._reset()
        return scalars

    def _epoch_data(self, epoch, step, head, feats, labels, target, other, norms, correct, weight_norms) -> dict:
        """One epoch in the schema of store.py."""
        num_classes = int(getattr(head, "num_classes", head.weight.shape[0]))
        if weight_norms.numel() > MAX_SAVED_WEIGHT_NORMS:
            gen = torch.Generator().manual_seed(0)
            weight_norms = weight_norms[torch.randperm(weight_norms.numel(), generator=gen)[:MAX_SAVED_WEIGHT_NORMS]]
        data = {
            "epoch": np.int64(epoch),
            "step": np.int64(step),
            "labels": labels.numpy().astype(np.int32),
            "target_deg": target.numpy().astype(np.float32),
            "other_deg": other.numpy().astype(np.float32),
            "feature_norm": norms.numpy().astype(np.float32),
            "correct": correct.numpy(),
            "weight_norm": weight_norms.numpy().astype(np.float32),
            "num_classes": np.int64(num_classes),
            "normalized": np.bool_(is_normalized(head)),
            "weights_are_points": np.bool_(weights_are_points(head)),
            "head": np.str_(type(head).__name__),
        }
        if feats.shape[1] <= MAX_SAVED_DIM:
            weights = class_weights(head).cpu()
            if weights.shape[0] > MAX_SAVED_CLASSES:  # the classes present in the sample first
                class_ids = torch.unique(labels)[:MAX_SAVED_CLASSES]
            else:
                class_ids = torch.arange(weights.shape[0])
            data.update(
                features=feats.numpy().astype(np.float32),
                weights=weights.index_select(0, class_ids).numpy(),
                class_ids=class_ids.numpy().astype(np.int32),
            )
        return data

    # ---- at the end of the run -----------------------------------------------------------------------
    def end_run(self, step: int) -> None:
        """features_final.png, target_angles.png (first and last saved epoch), the embedding projector."""
        if self.figures:
            final = latest_with_features(self.run_dir)
            if final is not None:
                title = final_features_title(final)
                self.pool.submit(
                    "features_final.png",
                    "figures/features_final",
                    step,
                    lambda: features_epoch_figure(final, title=title),
                )
            if list_epochs(self.run_dir):
                self.pool.submit(
                    "target_angles.png", "figures/target_angles", step, lambda: target_angles_figure(self.run_dir)
                )
        self.pool.close()
        if self.writer is not None and self.last_sample is not None:
            write_projector(self.writer, self.last_sample, step, self.thumbs, self.thumb_labels)
