"""What a head offers the geometry probe, declared in one place (as pytorch-metric-learning's
``ModuleWithRecords`` keeps a loss's recordable values beside the loss rather than in it).

A head (``ProbedHead``) declares, as plain attributes:

- ``normalized_features``: it classifies x/||x|| (so the unit circle / sphere is worth drawing);
- ``weights_are_points``: its class weights are prototypes in feature space (RBF-Softmax), not directions;
- ``probe_margin``: the margin the probe's violation count uses (``ProbeMargin``);
- ``probe_record``: a ``ProbeRecord``, the (detached, B x C) cosines of its last forward (or, from a
  chunked loss that never builds them, the two B-vectors the step statistics need), kept only
  while ``probe_record.enabled`` (the trainer turns it off on the steps that log no geometry, so a
  head skips the pieces it would compute for it: no extra work there).

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


class LazyCosine:
    """Recipe for a head's probe cosines, computed only when ``probe_record.cosine`` is read.

    ``cos = (raw - bias) * row_scale[:, None] * col_scale[None, :]`` clamped to [-1, 1], with the
    target column taken from ``target_raw`` (the raw values before a margin replaced them). Every
    piece is captured at forward time (detached), so an optimizer step in between changes nothing;
    ``raw`` is an alias of the logits, checked against in-place edits made after the forward (not
    when it was made inside a torch.compile'd forward: the version seen while tracing is not the
    compiled output's).
    """

    __slots__ = ("bias", "col_scale", "labels", "raw", "row_scale", "target_raw", "version")

    def __init__(self, raw: Tensor, *, row_scale=None, col_scale=None, bias=None, labels=None, target_raw=None):
        self.raw = raw.detach()
        self.version = None if torch.compiler.is_compiling() else raw._version
        self.row_scale, self.col_scale, self.bias = row_scale, col_scale, bias
        self.labels, self.target_raw = labels, target_raw

    def check_intact(self) -> None:
        if self.version is not None and self.raw._version != self.version:
            raise RuntimeError(
                "the head's logits were modified in place after its forward, so its probe "
                "cosines (probe_record.cosine) can no longer be computed from them"
            )

    @torch.no_grad()
    def compute(self) -> Tensor:
        self.check_intact()
        raw = self.raw
        cos = raw - self.bias if self.bias is not None else None
        for scale, dim in ((self.col_scale, 0), (self.row_scale, 1)):
            if scale is None:
                continue
            if isinstance(scale, Tensor) and scale.dim() == 1:
                scale = scale.unsqueeze(dim)
            cos = raw * scale if cos is None else cos.mul_(scale)
        if cos is None:
            cos = raw.clone()
        if self.labels is not None:
            idx = self.labels.view(-1, 1)
            t = self.target_raw.view(-1, 1).to(cos.dtype)
            if self.bias is not None:
                t = t - self.bias[self.labels].view(-1, 1)
            for scale, pick in ((self.col_scale, True), (self.row_scale, False)):
                if scale is None:
                    continue
                if isinstance(scale, Tensor) and scale.dim() == 1:
                    scale = (scale[self.labels] if pick else scale).view(-1, 1)
                t = t * scale
            cos.scatter_(1, idx, t)
        return cos.clamp_(-1.0, 1.0)


class ProbeRecord:
    """The cosines of a head's last forward for the geometry probe: a detached B x C tensor, or a
    ``LazyCosine`` recipe computed (once) on first read, so steps that never read it skip the B x C pass.

    ``enabled`` (default on): whether the head keeps them at all; the trainer turns it off on the steps
    that log no geometry, and ``keep`` then drops what it is given (the head's ``forward`` clears the
    record too, so a head that never calls ``keep`` leaves nothing stale behind).
    """

    def __init__(self):
        self.enabled = True
        self.pending: Tensor | LazyCosine | None = None  # what the head kept (a tensor or a recipe)
        #: (cos theta_y, the largest non-target cosine), B each: what a chunked loss keeps instead of the cosines
        self._nearest: tuple[Tensor, Tensor] | None = None
        #: per row, the factor still to apply to what was kept (``unfloor``), on first read; None: none
        self._row_ratio: Tensor | None = None

    def keep(self, value: Tensor | LazyCosine | None) -> None:
        """Keeps ``value`` (detached cosines or a recipe) when enabled; else clears the record."""
        self.pending = value if self.enabled else None
        self._nearest = self._row_ratio = None

    def keep_nearest(self, target: Tensor, other: Tensor) -> None:
        """Keeps only the target and nearest non-target cosines (B each, detached) when enabled: all the step
        statistics read (geometry/stats.py), from a loss that never holds the B x C cosines."""
        self.pending = self._row_ratio = None
        self._nearest = (target.detach(), other.detach()) if self.enabled else None

    def clear(self) -> None:
        self.pending = self._nearest = self._row_ratio = None

    def unfloor(self, embeddings: Tensor) -> None:
        """What was kept are cosines of the floored feature x / max(||x||, FEATURE_EPS) (``normalize_features``),
        which below the floor are those of x / ||x|| times ||x|| / FEATURE_EPS: they are read as the cosines of
        x / ||x|| instead (times ``unfloor_ratio``, 1 at and above the floor: unchanged there). Idempotent: a
        head's forward and its chunked loss may both call it."""
        if self.pending is not None or self._nearest is not None:
            norm = torch.linalg.vector_norm(at_least_float32(embeddings.detach()), dim=1)
            self._row_ratio = unfloor_ratio(norm)

    def _unfloored(self, cos: Tensor) -> Tensor:
        """``cos`` (B, or B x C) times the row ratio of ``unfloor``, clamped as the cosines are."""
        ratio = self._row_ratio.to(cos.dtype)
        return (cos * ratio.view(-1, *(1,) * (cos.dim() - 1))).clamp_(-1.0, 1.0)

    @property
    def nearest(self) -> tuple[Tensor, Tensor] | None:
        """(cos theta_y, the largest non-target cosine), B each, that a chunked loss kept, or None."""
        if self._nearest is not None and self._row_ratio is not None:
            self._nearest = (self._unfloored(self._nearest[0]), self._unfloored(self._nearest[1]))
            self._row_ratio = None
        return self._nearest

    @property
    def cosine(self) -> Tensor | None:
        """The (detached, B x C) cosines of the last forward, or None."""
        value = self.pending
        if isinstance(value, LazyCosine):
            value = self.pending = value.compute()
        if value is not None and self._row_ratio is not None:
            value = self.pending = self._unfloored(value)
            self._row_ratio = None
        return value


@runtime_checkable
class ProbedHead(Protocol):
    """What the geometry probe (marginlab/geometry/) reads from a head: nothing else."""

    weight: Tensor
    num_classes: int
    normalized_features: bool
    weights_are_points: bool
    probe_margin: ProbeMargin
    probe_record: ProbeRecord


def recorded_cosine(head) -> Tensor | None:
    """The head's probe cosines of its last forward; None when it offers none (e.g. Partial FC's
    sampled shard, which has no ``probe_record``)."""
    record = getattr(head, "probe_record", None)
    return None if record is None else record.cosine


def recorded_nearest(head) -> tuple[Tensor, Tensor] | None:
    """(cos theta_y, the largest non-target cosine) that a chunked loss kept instead of the cosines
    (``ProbeRecord.keep_nearest``); None otherwise (read ``recorded_cosine`` then)."""
    record = getattr(head, "probe_record", None)
    return None if record is None else record.nearest


def set_recording(head, enabled: bool) -> None:
    """Turns the head's probe record on or off (a no-op for a head without one)."""
    record = getattr(head, "probe_record", None)
    if record is not None:
        record.enabled = bool(enabled)


def probe_margin(head) -> ProbeMargin:
    """The head's ``probe_margin`` (no margin for a head that declares none)."""
    return getattr(head, "probe_margin", None) or ProbeMargin()
