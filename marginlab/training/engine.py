"""The loop: ``train_one_epoch`` and ``evaluate``, each a few steps anyone can read top to bottom; what the training
loop takes (``StepParts``, ``LoopOptions``) and where it stands (``LoopState``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from marginlab.distributed.runtime import DistContext
from marginlab.errors import TrainingError
from marginlab.geometry.stats import GeometryMeter, batch_geometry, target_and_nearest_other, weight_stats
from marginlab.heads.probe import logit_stats
from marginlab.losses import MarginLoss, criterion_for
from marginlab.training.builders import MarginModel
from marginlab.training.epoch_meter import EpochMeter
from marginlab.training.precision import Precision


@dataclass
class LoopState:
    """Where the loop stands, what a checkpoint must carry besides the weights to continue exactly
    (checkpoint.py saves and restores it)."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken (skipped non-finite steps excluded)
    best_metric: float = -math.inf
    best_record: dict = field(default_factory=dict)  # the selected epoch's evaluation metrics (train.py)
    nonfinite_total: int = 0
    nonfinite_streak: int = 0


@dataclass
class StepParts:
    """What an optimizer step touches: the model, the optimizer and its schedule, the training loss (default
    ``criterion_for(model)``) and the forward that runs the model (default the model itself; a compiled or DDP
    view of it)."""

    model: MarginModel
    optimizer: torch.optim.Optimizer
    scheduler: object
    criterion: MarginLoss | None = None
    forward: Callable | None = None


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs, the same every epoch: gradient clipping (None: off), how many non-finite losses in a row
    stop the run, channels-last images, every how many steps the step scalars are logged, the progress bar."""

    grad_clip: float | None
    max_nonfinite: int
    channels_last: bool
    log_every: int
    progress: bool = False


def to_device(batch, device: torch.device, channels_last: bool):
    images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def train_one_epoch(
    parts: StepParts,
    loader,
    prec: Precision,
    state: LoopState,
    options: LoopOptions,
    *,
    log=None,
    desc: str = "",
    dist: DistContext = DistContext(),
) -> dict[str, float]:
    """One pass over ``loader``; with ``dist`` enabled the epoch's loss/accuracy are summed over the ranks.

    ``criterion`` (default ``criterion_for(model)``) turns the head's output into the loss, the predictions and,
    on the steps that log geometry, the step statistics (``criterion.step``); one whose head is sharded (Partial
    FC) yields neither a training accuracy nor statistics: no rank holds all the logits."""
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    model.train()
    criterion = criterion_for(model) if parts.criterion is None else parts.criterion
    classifies = criterion.classifies
    sharded = criterion.sharded_parameters() if dist.enabled else []
    forward = model if parts.forward is None else parts.forward
    meter = EpochMeter(prec.device, classifies)
    skipped, start = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not options.progress, dynamic_ncols=True)
    for batch in bar:
        images, labels = to_device(batch, prec.device, options.channels_last)
        logs = (state.step + 1) % options.log_every == 0  # the step statistics only on the steps that log them
        with prec.autocast():  # forward under AMP; heads do their margin arithmetic in float32
            embeddings, output = forward(images, labels, stats=logs)
            loss, predicted, geometry = criterion.step(embeddings, output, labels, stats=logs)
        if not dist.all_finite(loss):  # sync point: a non-finite loss (on any rank) skips the step
            optimizer.zero_grad(set_to_none=True)
            skipped += 1
            state.nonfinite_total += 1
            state.nonfinite_streak += 1
            if state.nonfinite_streak >= options.max_nonfinite:
                raise TrainingError(
                    f"{state.nonfinite_streak} consecutive non-finite losses (last {loss.item()}) "
                    f"at step {state.step}: "
                    "training diverged. Lower optim.lr, the head's s or m, or use trainer.precision=32"
                )
            continue
        state.nonfinite_streak = 0
        optimizer.zero_grad(set_to_none=True)
        prec(loss, optimizer, options.grad_clip, model.parameters(), dist, sharded)  # backward, clip, step
        scheduler.step()
        state.step += 1
        meter.update(loss, predicted, labels)
        if state.step % options.log_every == 0:  # sync point: step scalars, geometry of this batch, progress bar
            step_stats = {"loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]}
            if classifies:
                step_stats["acc"] = (predicted == labels).float().mean().item()
            if geometry is not None:
                step_stats.update(batch_geometry(embeddings.detach(), None, labels, model.head, geometry))
            if log is not None:
                log.scalars(step_stats, state.step, prefix="step/")
            bar.set_postfix({k: f"{step_stats[k]:.3f}" for k in ("loss", "acc") if k in step_stats})
    bar.close()
    elapsed = time.perf_counter() - start
    loss_total, correct_total, seen = meter.totals(dist.all_reduce_sum)
    stats = {
        "loss": loss_total / max(seen, 1),
        "acc": correct_total / max(seen, 1),
        "nonfinite_steps": skipped,
        "images_per_s": seen / max(elapsed, 1e-9),
        "lr": optimizer.param_groups[0]["lr"],
    }
    if not classifies:
        del stats["acc"]
    return stats


@torch.no_grad()
def nonfinite_state(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers (BatchNorm's running statistics too) holding NaN or inf."""
    named = [(k, t) for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    if not named:
        return []
    bad = torch.stack([~torch.isfinite(t).all() for _, t in named]).tolist()  # sync point: one per epoch
    return [k for (k, _), b in zip(named, bad) if b]


def check_finite_state(model: torch.nn.Module, epoch: int, dist: DistContext = DistContext()) -> None:
    """The non-finite guard on the weights, not only the loss: a TrainingError when any rank's parameters or
    buffers hold NaN or inf after ``epoch`` (a finite loss can hide an inf BatchNorm variance). All ranks call."""
    bad = nonfinite_state(model)
    device = next(model.parameters()).device
    if dist.all_finite(torch.tensor(math.nan if bad else 0.0, device=device)):
        return
    where = (
        f"{len(bad)} of the weights ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})"
        if bad
        else "another rank's weights"
    )
    raise TrainingError(
        f"training diverged in epoch {epoch}: {where} hold NaN or inf, so no checkpoint was "
        "written from them. Lower optim.lr, the head's s or m, or use trainer.precision=32"
    )


@torch.no_grad()
def evaluate(
    model: MarginModel,
    loader,
    prec: Precision,
    *,
    channels_last: bool,
    probe_max_samples: int,
    forward=None,
    probe=None,
) -> dict[str, float]:
    """Plain (margin-free) logits: loss, accuracy and the geometry of at most ``probe_max_samples`` samples.

    ``probe`` (a marginlab.geometry.probe.GeometryProbe) is handed a bounded sample of features, cosines and
    predictions.
    """
    model.eval()
    forward = model if forward is None else forward
    loss_sum, correct, seen = 0.0, 0, 0
    meter = GeometryMeter()
    for batch in loader:
        images, labels = to_device(batch, prec.device, channels_last)
        with prec.autocast():
            embeddings, logits = forward(images)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.numel()
        if meter.n < probe_max_samples:
            keep = min(labels.numel(), probe_max_samples - meter.n)
            labels_kept, cos = labels[:keep], None
            # once, for the meter and the probe: off the logits when the head maps them to its cosines, else from
            # the head's pure cosines (a second B x C x D product)
            nearest = logit_stats(model.head, logits[:keep], embeddings[:keep], labels_kept)
            if nearest is None:
                with prec.autocast():  # the head's pure cosines, as its forward computes them
                    cos = model.head.cosine(embeddings)[:keep]
                nearest = target_and_nearest_other(cos.float(), labels_kept)
            meter.update(embeddings[:keep], cos, labels_kept, model.head, nearest=nearest)
            if probe is not None and probe.wants_more:
                probe.collect(
                    embeddings[:keep], cos, labels_kept, logits[:keep].argmax(1), images[:keep], nearest=nearest
                )
    stats = {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1)}
    stats.update(meter.compute())
    stats.update(weight_stats(model.head.weight))
    return stats
