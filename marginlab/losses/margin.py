"""``MarginLoss``: cross-entropy on a margin head's logits + regularizers + the head's own loss term.

``MarginLoss.step`` is the one place that turns a head's training output (B x C logits, a ``HeadLoss`` or
``HeadScores``: heads/output.py) into a ``CriterionStep``: the loss, each row's predicted class and, on the steps
that log geometry, the probe's step statistics (``StepStats``: the head's own, else from its pure ``cosine``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.errors import ConfigError
from marginlab.geometry.stats import target_and_nearest_other
from marginlab.heads.base import check_chunkable
from marginlab.heads.output import HeadLoss, HeadScores, StepStats


class CriterionStep(NamedTuple):
    """What a training step's criterion gives the trainer (``MarginLoss.step``).

    ``loss``: 0-dim, regularizers and the head's own term included; ``predicted``: each row's predicted class
    (B, detached) for the training accuracy, None when the criterion does not ``classify``; ``stats``: the probe's
    step statistics when they were asked for (None otherwise, and where no rank holds every class: Partial FC).
    """

    loss: Tensor
    predicted: Tensor | None
    stats: StepStats | None


def _regularizer_dict(regularizers) -> nn.ModuleDict:
    """``None``, a mapping name -> module (an ``nn.ModuleDict`` is kept as it is) or an iterable of modules."""
    if isinstance(regularizers, nn.ModuleDict):
        return regularizers
    if regularizers is None:
        return nn.ModuleDict()
    if isinstance(regularizers, nn.Module):
        regularizers = [regularizers]
    items = (
        regularizers.items()
        if isinstance(regularizers, Mapping)
        else ((type(r).__name__, r) for r in regularizers)
        if isinstance(regularizers, Iterable)
        else None
    )
    if items is None:
        raise TypeError(
            f"MarginLoss(regularizers=...) takes a regularizer module, a list or a dict of them; "
            f"got {type(regularizers).__name__}"
        )
    out = nn.ModuleDict()
    for name, reg in items:
        if not isinstance(reg, nn.Module):
            raise TypeError(
                f"MarginLoss(regularizers=...): {name!r} is a {type(reg).__name__}, not a regularizer "
                "module (e.g. marginlab.regularizers.center.CenterLoss)"
            )
        out[name if name not in out else f"{name}_{len(out)}"] = reg
    return out


def logits_regularizer(regularizers: nn.ModuleDict) -> str | None:
    """The name of the first regularizer that needs the logits (its ``forward`` takes ``logits`` without a
    default, e.g. Incay); None when none does."""
    for name, reg in regularizers.items():
        param = inspect.signature(reg.forward).parameters.get("logits")
        if param is not None and param.default is inspect.Parameter.empty:
            return name
    return None


def check_chunked(head: nn.Module, regularizers: nn.ModuleDict) -> None:
    """A ``chunked`` head's training output is its loss, not logits: its margin must be chunkable and no
    regularizer may need the logits. With ``chunked="auto"`` neither is an error: the head then never chunks."""
    mode = getattr(head, "chunked", False)
    if mode == "auto":
        name = logits_regularizer(regularizers)
        if name is not None:
            head.keep_unchunked(f"regularizer {name!r} needs the logits")
        return
    check_chunkable(head)
    name = logits_regularizer(regularizers)
    if name is not None:
        raise ConfigError(
            f"regularizer {name!r} needs the logits, which head.chunked=true never builds: "
            "use head.chunked=false or auto with it"
        )


class MarginLoss(nn.Module):
    """``loss = criterion(embeddings, labels)``: the head's margin logits, their cross-entropy, plus each
    regularizer's weighted term and the head's own (``head.extra_loss()``: MagFace's g, easy to forget by hand).

    ``head``: a margin head (``marginlab.heads``), which owns the class weights: pass ``criterion.parameters()``
    (or the head's) to the optimizer. ``regularizers``: a regularizer module, a list or a dict of them
    (``marginlab.regularizers``), each called as ``reg(embeddings, labels, logits)``.

    The trainer calls ``step`` instead, with the output its (compiled, DDP-wrapped) model made. A head that is a
    loss of its own (``produces_loss``) and a ``chunked`` head's training step (heads/base.py: the loss in class
    blocks, never the B x C logits; ``chunked="auto"`` on the steps whose logits are large) return a
    ``HeadLoss``, which is the loss, with its predictions and, on the steps that log geometry, its statistics.
    """

    #: every class is scored on this rank: the trainer reports a training accuracy (``CriterionStep.predicted``)
    classifies = True

    #: the class weights are split over the ranks and the head runs its own collectives (Partial FC)
    sharded = False

    def __init__(self, head: nn.Module, regularizers=None):
        super().__init__()
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"MarginLoss(head=...) takes a margin head module (e.g. marginlab.heads.ArcFace("
                f"in_features, num_classes)); got {type(head).__name__} {head!r:.60}"
            )
        self.head = head
        self.regularizers = _regularizer_dict(regularizers)
        if getattr(head, "produces_loss", False):
            name = logits_regularizer(self.regularizers)
            if name is not None:
                raise ConfigError(
                    f"regularizer {name!r} needs the logits, which {type(head).__name__} never builds: it is a "
                    "loss of its own; use a regularizer that reads the features (e.g. center)"
                )
        if getattr(head, "chunked", False) is not False:
            check_chunked(head, self.regularizers)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The scalar training loss of a batch: ``embeddings`` (B x D), ``labels`` (B) class indices."""
        self._check_arguments(embeddings, labels)
        return self.from_head_output(embeddings, self.head(embeddings, labels), labels)

    def step(
        self, embeddings: Tensor, output: Tensor | HeadLoss | HeadScores, labels: Tensor, stats: bool = False
    ) -> CriterionStep:
        """The trainer's one call per step: the loss (``from_head_output``), each row's predicted class and, with
        ``stats`` (a step that logs geometry), the probe's step statistics, from the head's ``HeadLoss`` or
        ``HeadScores`` when it computed them, else from its pure ``cosine`` (no gradient: the step is unchanged)."""
        head_stats = None
        if isinstance(output, HeadScores):  # the logits, with the statistics read off the forward's cosines
            output, head_stats = output
        loss = self.from_head_output(embeddings, output, labels)
        head_loss = output if isinstance(output, HeadLoss) else None
        predicted = None
        if self.classifies:
            predicted = output.detach().argmax(1) if head_loss is None else head_loss.predicted
        step_stats = None
        if stats:
            step_stats = head_loss.stats if head_loss is not None else head_stats
            if step_stats is None:
                step_stats = self.cosine_stats(embeddings, labels)
        return CriterionStep(loss, predicted, step_stats)

    @torch.no_grad()
    def cosine_stats(self, embeddings: Tensor, labels: Tensor) -> StepStats | None:
        """The step statistics from the head's pure ``cosine`` of this batch (its weights as the forward used)."""
        cos = self.head.cosine(embeddings.detach())
        return StepStats(*target_and_nearest_other(cos.float(), labels))

    def from_head_output(self, embeddings: Tensor, output: Tensor | HeadLoss, labels: Tensor) -> Tensor:
        """The loss given the head's output for this batch (no checks, no sync): cross-entropy on its logits, or
        the ``HeadLoss`` of a head that is a loss of its own or of a ``chunked`` step (heads/output.py)."""
        if isinstance(output, HeadLoss):
            return self.add_terms(output.loss.float(), embeddings, output, labels)
        return self.add_terms(F.cross_entropy(output.float(), labels), embeddings, output, labels)

    def add_terms(self, loss: Tensor, embeddings: Tensor, output: Tensor | HeadLoss, labels: Tensor) -> Tensor:
        """``loss`` + each regularizer's weighted term + the head's own term (None for most heads)."""
        for reg in self.regularizers.values():
            loss = loss + reg(embeddings, labels, output)
        extra = self.head.extra_loss()
        return loss if extra is None else loss + extra

    # ---- what the trainer asks of a criterion ------------------------------------------------------------------
    @property
    def margin_head(self) -> nn.Module:
        """The head whose margin acts (the feasibility check, an evaluation copy): the head itself."""
        return self.head

    def sharded_parameters(self) -> list[nn.Parameter]:
        """The parameters every rank holds a different shard of (their gradient norm sums over the ranks)."""
        return []

    def checkpoint_entries(self) -> dict:
        """What a checkpoint must hold besides the weights for this loss to continue exactly."""
        return {}

    def restore_checkpoint_entries(self, checkpoint: dict, step: int) -> None:
        """Takes back ``checkpoint_entries`` (``step``: the optimizer steps taken, for checkpoints without them)."""

    # ---- library use: one line naming the argument ----------------------------------------------------------
    def _check_arguments(self, embeddings, labels) -> None:
        for name, value in (("embeddings", embeddings), ("labels", labels)):
            if not isinstance(value, Tensor):
                raise TypeError(f"MarginLoss: {name} must be a tensor, got {type(value).__name__}")
        in_features = getattr(self.margin_head, "in_features", None)
        if embeddings.dim() != 2 or (in_features is not None and embeddings.shape[1] != in_features):
            raise ConfigError(
                f"MarginLoss: embeddings of shape {tuple(embeddings.shape)} do not fit "
                f"{type(self.margin_head).__name__}(in_features={in_features}): give (batch, "
                f"{in_features}), e.g. a backbone whose output size is the head's in_features"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ConfigError(
                f"MarginLoss: labels of shape {tuple(labels.shape)} do not match embeddings of "
                f"shape {tuple(embeddings.shape)}: give one class index per embedding, shape "
                f"({embeddings.shape[0]},)"
            )
        if labels.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"MarginLoss: labels must be integer class indices, got dtype {labels.dtype}")
        num_classes = getattr(self, "num_classes", None) or getattr(self.margin_head, "num_classes", None)
        if labels.device.type == "cpu" and num_classes is not None and labels.numel():  # on a GPU: no sync
            low, high = labels.min().item(), labels.max().item()
            if low < 0 or high >= num_classes:
                bad = low if low < 0 else high
                raise ConfigError(
                    f"MarginLoss: labels hold class {bad}, but the head has num_classes="
                    f"{num_classes}: labels must lie in [0, {num_classes - 1}]"
                )
