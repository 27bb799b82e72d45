"""ArcFace (Deng et al., CVPR 2019): target logit s cos(theta_y + m)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.errors import ConfigError
from marginlab.heads.base import CosineMarginHead, cos_plus_angle_and_slope
from marginlab.heads.probe import ProbeMargin

#: the ways of applying the margin, see ArcFaceHead
MODES = ("exact", "straight_through", "no_fallback")


class ArcFaceHead(CosineMarginHead):
    """Additive angular margin.

    ``mode="exact"`` (default): the exact-gradient form of the paper and of InsightFace's earlier
    ``ArcFace`` module. Where theta + m would pass pi (cos theta <= cos(pi - m)) the logit falls back
    to cos theta - m sin m so it keeps decreasing in theta; ``easy_margin`` applies the margin only
    where cos theta > 0.

    ``mode="straight_through"``: InsightFace's current arcface_torch code
    (recognition/arcface_torch/losses.py, ``ArcFace`` and ``CombinedMarginLoss`` with m1 = 1, m3 = 0):
    under ``torch.no_grad()`` it takes ``arccos_`` of the clamped logits, adds m to the target angle
    and takes ``cos_``; the result is then multiplied by s outside no_grad. The forward value is
    s cos(theta_y + m) with no threshold and no fallback, and since the in-place no_grad edits are
    invisible to autograd the gradient is that of s cos theta_y (d logit / d cos = s for every
    column). Here the margin is that value, cos(acos(cos theta_y) + m), with slope 1, on the B target
    cosines only; InsightFace's round trip cos(acos(c)) on the non-target columns is the identity up
    to rounding and is skipped. ``easy_margin`` does not exist in this mode.

    ``mode="no_fallback"``: InsightFace's mxnet ``margin_softmax`` (recognition/arcface_mxnet/train.py,
    and recognition/subcenter_arcface/train_parall.py, Sub-center ArcFace's default): ``arccos`` of the
    target cosine, ``+ m``, ``cos``, all differentiated: s cos(theta_y + m) with its exact gradient
    ``cos m + cos theta sin m / sin theta`` and no threshold, so past theta = pi - m the logit grows
    again with theta. ``easy_margin`` does not exist in this mode.

    W starts as N(0, 0.01^2) (``init=official``), as in arcface_torch.
    """

    # insightface recognition/arcface_torch/partial_fc_v2.py: torch.normal(0, 0.01, (num_local, D))
    official_init = "normal_0.01"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        easy_margin: bool = False,
        mode: str = "exact",
        **common,
    ):
        super().__init__(in_features, num_classes, s=s, **common)
        self.m = check_float("m", m, low=0.0, high=math.pi / 2)
        self.probe_margin = ProbeMargin(m2=self.m)  # theta_y + m must stay below the nearest non-target angle
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed: it must be one of {', '.join(MODES)}")
        self.mode = mode
        self.easy_margin = bool(easy_margin)
        if self.easy_margin and mode != "exact":
            raise ConfigError(f"easy_margin=True is not allowed with mode={mode!r}: it exists only in mode 'exact'")
        self.cos_m, self.sin_m = math.cos(self.m), math.sin(self.m)
        self.threshold = math.cos(math.pi - self.m)
        self.fallback = math.sin(math.pi - self.m) * self.m  # = m sin m

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, Tensor | float]:
        if self.mode == "straight_through":
            # ArcFace eq. 3 as InsightFace arcface_torch computes it: cos(arccos(cos theta) + m) on the
            # B target values, with the gradient of cos theta (slope 1)
            return torch.cos(torch.acos(cos_target) + self.m), 1.0
        # ArcFace eq. 3: cos(theta + m) = cos theta cos m - sin theta sin m
        phi, slope = cos_plus_angle_and_slope(cos_target, self.cos_m, self.sin_m)
        if self.mode == "no_fallback":
            return phi, slope
        if self.easy_margin:
            keep = cos_target > 0
            return torch.where(keep, phi, cos_target), torch.where(keep, slope, 1.0)
        keep = cos_target > self.threshold  # else the fallback cos theta - m sin m, slope 1
        return torch.where(keep, phi, cos_target - self.fallback), torch.where(keep, slope, 1.0)
