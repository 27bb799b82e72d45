"""What a head offers the geometry probe, declared in one place (as pytorch-metric-learning's
``ModuleWithRecords`` keeps a loss's recordable values beside the loss rather than in it).

A head (``ProbedHead``) declares, as plain attributes:

- ``normalized_features``: it classifies x/||x|| (so the unit circle / sphere is worth drawing);
- ``weights_are_points``: its class weights are prototypes in feature space (RBF-Softmax), not directions;
- ``probe_margin``: the margin the probe's violation count uses (``ProbeMargin``);

and offers ``cosine(embeddings)``: its pure, margin-free B x C cosines (no state, no gradient), which
evaluation and the probe read. A training step's statistics come back from the criterion with the loss
(marginlab/losses: ``CriterionStep.stats``), never through state kept on the head. ``scaled_cosine`` and
``unfloored`` are the pieces heads build ``cosine`` from. A head whose cosines are a per-row increasing map of its
logits offers that map (``cosine_of_logits``): ``logit_stats`` then reads the statistics off the logits the
forward made (evaluation's, or a training step's with the pre-margin target), with no second B x C x D product.

The probe (marginlab/geometry/) reads only these, never a concrete head class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from marginlab.dtypes import at_least_float32
from marginlab.heads.kernels import unfloor_ratio
from marginlab.heads.output import StepStats


@dataclass(frozen=True)
class ProbeMargin:
    """A head's margin as the probe counts it: a sample violates it when the target's margined cosine
    ``cos(min(m1 theta_y + m2, pi)) - m3`` does not beat the nearest non-target cosine.

    ``m1`` multiplicative angular (L-Softmax, SphereFace), ``m2`` additive angular (ArcFace, MagFace's
    l_m), ``m3`` additive cosine (AM-Softmax / CosFace, AdaFace's m); all neutral: no margin.
    """

    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.0

    @property
    def enforced(self) -> bool:
        """Whether there is a margin at all (the margin advisor checks only heads that have one)."""
        return self.m1 != 1.0 or self.m2 != 0.0 or self.m3 != 0.0

    def violation(self, cos_target: Tensor, cos_other: Tensor) -> Tensor:
        """True where the target cosine does not beat the nearest non-target cosine by the margin."""
        if self.m1 == 1.0 and self.m2 == 0.0:
            # additive cosine margin (AM-Softmax eq. 3): cos theta_y - m must beat cos theta_other
            return cos_target - cos_other <= self.m3
        theta_y = torch.acos(cos_target.clamp(-1.0, 1.0))
        if self.m3 == 0.0:
            # angular margins (L-Softmax psi, ArcFace eq. 3): m1 theta_y + m2 must stay below theta_other
            return self.m1 * theta_y + self.m2 >= torch.acos(cos_other.clamp(-1.0, 1.0))
        # ArcFace paper, combined margin: cos(m1 theta + m2) - m3 (angle capped at pi) must beat cos theta_other
        return torch.cos((self.m1 * theta_y + self.m2).clamp_max(math.pi)) - self.m3 <= cos_other


@torch.no_grad()
def scaled_cosine(raw: Tensor, *, row_scale=None, col_scale=None, bias=None) -> Tensor:
    """Cosines from a head's plain scores: ``(raw - bias) * col_scale[None, :] * row_scale[:, None]``, clamped to
    [-1, 1] (each of the three optional; a scale is a number or a vector). ``raw`` is left unchanged."""
    cos = raw - bias if bias is not None else None
    for scale, dim in ((col_scale, 0), (row_scale, 1)):
        if scale is None:
            continue
        if isinstance(scale, Tensor) and scale.dim() == 1:
            scale = scale.unsqueeze(dim)
        cos = raw * scale if cos is None else cos.mul_(scale)
    if cos is None:
        cos = raw.clone()
    return cos.clamp_(-1.0, 1.0)


@torch.no_grad()
def unfloored(cos: Tensor, embeddings: Tensor) -> Tensor:
    """``cos`` (B, or B x C) of ``normalize_features``' floored feature x / max(||x||, FEATURE_EPS) read
    as the cosines of x / ||x||: times ``unfloor_ratio`` per row (1 at and above the floor: unchanged there),
    clamped. What a head whose ``probe_floored`` is set gives from ``cosine``."""
    ratio = unfloor_ratio(torch.linalg.vector_norm(at_least_float32(embeddings.detach()), dim=1)).to(cos.dtype)
    return (cos * ratio.view(-1, *(1,) * (cos.dim() - 1))).clamp_(-1.0, 1.0)


@torch.no_grad()
def logit_stats(head, logits: Tensor, embeddings: Tensor, labels: Tensor, target: Tensor | None = None):
    """The step statistics (``StepStats``: cos theta_y, the nearest non-target cosine) of a batch read off the
    head's B x C logits by its ``cosine_of_logits``; None when the head has no such map (ask its ``cosine``).

    ``target``: the B target logits before a margin replaced them (training); None: the logits' own (evaluation).
    The map is increasing within a row, so the top two logits are the top two cosines: the same values as
    ``target_and_nearest_other(head.cosine(x))`` when the logits are those ``cosine`` reads (evaluation), from two
    B-vectors instead of the B x C matrix."""
    cosine_of_logits = getattr(head, "cosine_of_logits", None)
    if cosine_of_logits is None or logits.shape[1] < 2:  # (one class: target_and_nearest_other's own case)
        return None
    logits, idx = logits.detach(), labels.view(-1, 1)
    raw_target = logits.gather(1, idx) if target is None else target.detach().view(-1, 1).to(logits.dtype)
    top, top_idx = logits.topk(2, dim=1)
    # the largest non-target logit: the first unless it is the target's own (geometry/stats.py)
    other = torch.where(top_idx[:, :1] == idx, top[:, 1:], top[:, :1])
    cos = cosine_of_logits(torch.cat([raw_target, other], dim=1), embeddings)
    return None if cos is None else StepStats(*cos.float().unbind(1))


@runtime_checkable
class ProbedHead(Protocol):
    """What the geometry probe (marginlab/geometry/) reads from a head: nothing else."""

    weight: Tensor
    num_classes: int
    normalized_features: bool
    weights_are_points: bool
    probe_margin: ProbeMargin

    def cosine(self, embeddings: Tensor) -> Tensor: ...


def probe_margin(head) -> ProbeMargin:
    """The head's ``probe_margin`` (no margin for a head that declares none)."""
    return getattr(head, "probe_margin", None) or ProbeMargin()
