"""The geometry probe: a bounded validation sample per evaluated epoch -> histograms, scalars, npz, figures.

``evaluate`` hands each batch's features, the cosines the head already made (``head.last_cosine``),
labels and predictions to ``collect`` until ``max_samples`` are held. ``end_epoch`` then logs the
histograms (feature norm of correctly / wrongly classified samples, target angle, nearest non-target
angle, realised angular margin, class-weight norms), returns the epoch's scalars (pairwise class-weight
angles, intra-class spread, inter-class angles of class means), writes ``geometry/epoch_XXX.npz`` (the
data to re-render every figure, bounded size) and, for 2-D / 3-D embeddings, draws
``figures/features_epoch_XXX.png``. ``end_run`` draws ``figures/features_final.png`` and
``figures/target_angles.png`` and writes the TensorBoard embedding projector. A figure never fails a run:
any exception while drawing is logged as a warning.

Figures are drawn on one background thread (matplotlib's Agg, no pyplot) from arrays that are never
changed afterwards, so drawing overlaps with the next epoch; their pixels reach TensorBoard from the
main thread (at the next ``end_epoch`` or in ``end_run``, which waits for every figure).
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from marginlab.errors import DataError
from marginlab.geometry import (class_angle_stats, class_weights, is_normalized, sample_angles,
                                weight_angle_stats, weights_are_points)

log = logging.getLogger(__name__)

GEOMETRY_DIR, FIGURES_DIR = "geometry", "figures"
MAX_SAVED_DIM = 3  # features and class weights go into the npz only for embeddings that can be drawn
MAX_SAVED_CLASSES = 1024  # class prototypes saved per epoch (2-D / 3-D)
MAX_SAVED_WEIGHT_NORMS = 4096
MAX_PAIRWISE_CLASSES = 2048  # pairwise weight angles: a fixed subset of classes above this
MAX_THUMBNAILS, THUMBNAIL_SIZE = 2048, 32  # embedding projector sprites (uint8, at most 6 MB)


# ---- the saved data (geometry/epoch_XXX.npz) -------------------------------------------------------

def epoch_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / GEOMETRY_DIR / f"epoch_{epoch:03d}.npz"


def list_epochs(run_dir: Path) -> list[Path]:
    """The run's saved epochs, in epoch order."""
    paths = Path(run_dir).glob(f"{GEOMETRY_DIR}/epoch_*.npz")
    numbered = [(int(m.group(1)), p) for p in paths if (m := re.fullmatch(r"epoch_(\d+)\.npz", p.name))]
    return [p for _, p in sorted(numbered)]


def load_epoch(path: Path) -> dict:
    """One saved epoch; a DataError naming the file when it cannot be read (truncated, corrupt, not an npz)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}
    except Exception as exc:  # noqa: BLE001 - whatever fails while parsing the file, the file is at fault
        raise DataError(f"{path} cannot be read, it is not a complete npz file ({type(exc).__name__}: {exc}); "
                        "delete it (the other epochs are still drawn) or re-run the training") from None


def save_epoch(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data)
    tmp.replace(path)


# ---- rendering from saved data (also used by `marginlab plot`) --------------------------------------

def has_features(data: dict) -> bool:
    return "features" in data and data["features"].ndim == 2 and data["features"].shape[1] in (2, 3)


def features_epoch_figure(data: dict, title: str | None = None):
    from marginlab.figures import features

    head = data.get("head", "")
    return features.features_figure(
        data["features"], data["labels"], data.get("weights"), normalized=bool(data.get("normalized", False)),
        num_classes=int(data.get("num_classes", 0)) or None, class_ids=data.get("class_ids"),
        weights_are_points=bool(data.get("weights_are_points", False)),
        title=title if title is not None else f"{head}, epoch {int(data['epoch'])}".lstrip(", "))


def target_angles_figure(run_dir: Path, title: str = ""):
    """First and last saved epoch of a run on one plot; None when nothing was saved."""
    from marginlab.figures import angles

    paths = list_epochs(run_dir)
    if not paths:
        return None
    chosen = [paths[0]] if len(paths) == 1 else [paths[0], paths[-1]]
    return angles.target_angle_figure([load_epoch(p) for p in chosen], title=title)


def latest_with_features(run_dir: Path) -> dict | None:
    """The last saved epoch when it holds drawable (2-D / 3-D) features, else None."""
    paths = list_epochs(run_dir)
    data = load_epoch(paths[-1]) if paths else None
    return data if data is not None and has_features(data) else None


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
        self.figure_seconds = 0.0  # drawing time, spent on the background thread
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[tuple[Future, str, int]] = []  # (figure pixels, TensorBoard tag, step)
        self._reset()

    @classmethod
    def from_config(cls, cfg, run_dir: Path, run_log) -> "GeometryProbe":
        return cls(run_dir, max_samples=cfg.logger.probe_max_samples, writer=run_log.writer,
                   figures=cfg.logger.figures)

    def _reset(self) -> None:
        self.n = 0
        self.parts: dict[str, list[Tensor]] = {k: [] for k in ("features", "labels", "target", "other", "pred",
                                                                 "thumbs")}
        self.seconds = 0.0

    @property
    def wants_more(self) -> bool:
        return self.n < self.max_samples

    # ---- during evaluate ------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, features: Tensor, cos: Tensor, labels: Tensor, predictions: Tensor,
                images: Tensor | None = None, nearest: tuple[Tensor, Tensor] | None = None) -> None:
        """Keeps up to ``max_samples`` samples: features, target / nearest non-target angles, predictions.

        ``nearest``: ``geometry.target_and_nearest_other(cos, labels)`` when the caller has it already."""
        start = time.perf_counter()
        keep = min(labels.numel(), self.max_samples - self.n)
        if keep <= 0:
            return
        labels = labels[:keep]
        if nearest is not None:
            nearest = (nearest[0][:keep], nearest[1][:keep])
        target, other = sample_angles(cos[:keep], labels, nearest)
        for key, value in (("features", features[:keep].float()), ("labels", labels), ("target", target),
                           ("other", other), ("pred", predictions[:keep])):
            self.parts[key].append(value.detach().cpu())
        if (images is not None and self.writer is not None and self.thumbs is None and images.dim() == 4
                and self.n < MAX_THUMBNAILS):
            self.parts["thumbs"].append(thumbnails(images[:min(keep, MAX_THUMBNAILS - self.n)]))
        self.n += keep
        self.seconds += time.perf_counter() - start

    # ---- at the end of an evaluated epoch ------------------------------------------------------------
    @torch.no_grad()
    def end_epoch(self, epoch: int, step: int, head) -> dict[str, float]:
        """Histograms to TensorBoard, npz, per-epoch figure; returns the epoch's geometry scalars."""
        self._log_images(wait=False)
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
            hists = {"feature_norm_correct": norms[correct], "feature_norm_wrong": norms[~correct],
                     "target_deg": target, "nearest_other_deg": other, "margin_deg": margin,
                     "weight_norm": weight_norms}
            for tag, values in hists.items():
                values = values[torch.isfinite(values)]  # a diverged run must not break the histogram
                if values.numel():
                    self.writer.add_histogram(f"geometry/{tag}", values.numpy(), step)

        data = self._epoch_data(epoch, step, head, feats, labels, target, other, norms, correct, weight_norms)
        save_epoch(epoch_path(self.run_dir, epoch), data)
        if self.parts["thumbs"]:
            self.thumbs = torch.cat(self.parts["thumbs"])
            self.thumb_labels = labels[:self.thumbs.shape[0]]
        self.last_sample = {"features": feats, "labels": labels, "correct": correct}
        if self.figures and has_features(data):
            self._submit(f"features_epoch_{epoch:03d}.png", "figures/features", step,
                         lambda: features_epoch_figure(data))
        scalars["probe/seconds"] = self.seconds + time.perf_counter() - start
        self._reset()
        return scalars

    def _epoch_data(self, epoch, step, head, feats, labels, target, other, norms, correct, weight_norms) -> dict:
        num_classes = int(getattr(head, "num_classes", head.weight.shape[0]))
        if weight_norms.numel() > MAX_SAVED_WEIGHT_NORMS:
            gen = torch.Generator().manual_seed(0)
            weight_norms = weight_norms[torch.randperm(weight_norms.numel(), generator=gen)[:MAX_SAVED_WEIGHT_NORMS]]
        data = {"epoch": np.int64(epoch), "step": np.int64(step), "labels": labels.numpy().astype(np.int32),
                "target_deg": target.numpy().astype(np.float32), "other_deg": other.numpy().astype(np.float32),
                "feature_norm": norms.numpy().astype(np.float32), "correct": correct.numpy(),
                "weight_norm": weight_norms.numpy().astype(np.float32), "num_classes": np.int64(num_classes),
                "normalized": np.bool_(is_normalized(head)), "weights_are_points": np.bool_(weights_are_points(head)),
                "head": np.str_(type(head).__name__)}
        if feats.shape[1] <= MAX_SAVED_DIM:
            weights = class_weights(head).cpu()
            if weights.shape[0] > MAX_SAVED_CLASSES:  # the classes present in the sample first
                class_ids = torch.unique(labels)[:MAX_SAVED_CLASSES]
            else:
                class_ids = torch.arange(weights.shape[0])
            data.update(features=feats.numpy().astype(np.float32), weights=weights.index_select(0, class_ids).numpy(),
                        class_ids=class_ids.numpy().astype(np.int32))
        return data

    # ---- at the end of the run -----------------------------------------------------------------------
    def end_run(self, step: int) -> None:
        """features_final.png, target_angles.png (first and last saved epoch), the embedding projector."""
        if self.figures:
            final = latest_with_features(self.run_dir)
            if final is not None:
                title = f"{final['head']}, final (epoch {final['epoch']})"
                self._submit("features_final.png", "figures/features_final", step,
                             lambda: features_epoch_figure(final, title=title))
            if list_epochs(self.run_dir):
                self._submit("target_angles.png", "figures/target_angles", step,
                             lambda: target_angles_figure(self.run_dir))
        self._log_images(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            log.info("geometry figures: %.2f s of drawing on the background thread", self.figure_seconds)
        if self.writer is not None and self.last_sample is not None:
            try:
                feats, labels, correct = (self.last_sample[k] for k in ("features", "labels", "correct"))
                thumbs = None
                if self.thumbs is not None and torch.equal(labels[:self.thumbs.shape[0]], self.thumb_labels):
                    n = self.thumbs.shape[0]  # the samples the sprites show (the same first samples each epoch)
                    feats, labels, correct, thumbs = feats[:n], labels[:n], correct[:n], self.thumbs.float() / 255
                meta = [[int(y), "yes" if ok else "no"] for y, ok in zip(labels, correct)]
                self.writer.add_embedding(feats, metadata=meta, metadata_header=["label", "correct"],
                                          label_img=thumbs, global_step=step, tag="val_features")
            except Exception as exc:  # noqa: BLE001 - a diagnostic never fails the run
                log.warning("embedding projector not written: %s: %s", type(exc).__name__, exc)

    # ---- figures: drawn on one background thread, logged to TensorBoard from the main thread --------
    def _submit(self, name: str, tag: str, step: int, make_figure) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="marginlab-figures")
        self._pending.append((self._pool.submit(self._draw, name, make_figure), tag, step))

    def _draw(self, name: str, make_figure) -> np.ndarray | None:
        """Draws one figure to figures/<name>; returns its pixels, or None (with a warning) when it fails."""
        from marginlab.figures import save_png

        start = time.perf_counter()
        try:
            fig = make_figure()
            return None if fig is None else save_png(fig, self.run_dir / FIGURES_DIR / name)
        except Exception as exc:  # noqa: BLE001 - a figure is never required for a run to succeed
            log.warning("figure %s not drawn: %s: %s", name, type(exc).__name__, exc)
            return None
        finally:
            self.figure_seconds += time.perf_counter() - start

    def _log_images(self, wait: bool) -> None:
        """Sends finished figures to TensorBoard (all of them, waiting, with ``wait``)."""
        still = []
        for future, tag, step in self._pending:
            if not (wait or future.done()):
                still.append((future, tag, step))
                continue
            rgba = future.result()
            if rgba is not None and self.writer is not None:
                try:
                    self.writer.add_image(tag, rgba[..., :3], step, dataformats="HWC")
                except Exception as exc:  # noqa: BLE001
                    log.warning("figure %s not logged to TensorBoard: %s: %s", tag, type(exc).__name__, exc)
        self._pending = still


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
        x = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                          align_corners=False, antialias=True)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12) * 255
    return x.round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous().cpu()
