"""Combined margin (ArcFace paper, Deng et al. CVPR 2019; InsightFace): s (cos(m1 theta + m2) - m3)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.heads.base import CosineMarginHead
from marginlab.heads.probe import ProbeMargin

#: the slope uses d acos / d cos = -1 / sqrt(1 - cos^2) only for |cos| <= 1 - eps (there |d acos / d cos|
#: <= ~2.2e3); within eps of +-1 (theta < ~4.5e-4 rad, or within that of pi) the slope is 0
_ACOS_EPS = 1e-7


class CombinedMarginHead(CosineMarginHead):
    """One head for the three margins: m1 multiplicative angular (SphereFace-style), m2 additive
    angular (ArcFace), m3 additive cosine (CosFace / AM-Softmax).

    As in InsightFace's ``margin_softmax`` (recognition/arcface_mxnet/train.py): when m1 = 1 and
    m2 = 0 the target is simply cos - m3 (no acos); otherwise theta_y = acos(cos theta_y) is taken of
    the B target cosines only (never the B x C matrix; its slope is kept finite near cos = +-1, see
    ``margin_and_slope``) and the target becomes cos(m1 theta_y + m2) - m3. There is no monotonic
    fallback where m1 theta + m2 passes pi (InsightFace has none): use ``arcface`` for ArcFace's
    exact-gradient form, ``sphereface`` for SphereFace's psi.
    Defaults are InsightFace's ``loss.combined`` setting (s = 64, m1 = 1.0, m2 = 0.3, m3 = 0.2).
    """

    # insightface recognition/arcface_torch/partial_fc_v2.py: torch.normal(0, 0.01, (num_local, D))
    official_init = "normal_0.01"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.3,
        m3: float = 0.2,
        **common,
    ):
        super().__init__(in_features, num_classes, s=s, **common)
        self.m1 = check_float("m1", m1, low=1.0, high=10.0)
        self.m2 = check_float("m2", m2, low=0.0, high=math.pi)
        self.m3 = check_float("m3", m3, low=0.0, high=2.0)
        # the probe's margin: cos(m1 theta_y + m2) - m3 (angle capped at pi) must beat the nearest non-target
        self.probe_margin = ProbeMargin(m1=self.m1, m2=self.m2, m3=self.m3)
        self.precise_target = not (self.m1 == 1.0 and self.m2 == 0.0)  # an angular margin: acos below

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, Tensor | float]:
        if not self.precise_target:
            # CosFace / AM-Softmax: cos(theta) - m3
            return cos_target - self.m3, 1.0
        # theta_y of the B target cosines only. The value is the exact acos; the slope is taken with
        # d theta / d cos = -1 / sqrt(1 - cos^2) for cos in [-1 + eps, 1 - eps] and 0 outside, so it is
        # finite within eps of +-1 where d acos / d cos = -inf, instead of clamping the value (an angle
        # error of up to 4.5e-4 rad).
        theta = torch.acos(cos_target)
        angle = self.m1 * theta + self.m2
        inside = cos_target.abs() <= 1.0 - _ACOS_EPS
        # ArcFace paper / InsightFace combined margin: cos(m1 theta + m2) - m3;
        # d/dcos = m1 sin(m1 theta + m2) / sqrt(1 - cos^2)
        slope = (self.m1 * torch.sin(angle) * inside) / torch.sqrt((1.0 - cos_target * cos_target).clamp_min(_ACOS_EPS))
        return torch.cos(angle) - self.m3, slope
