"""AM-Softmax (Wang et al. 2018) / CosFace (Wang et al. 2018): target logit s (cos(theta_y) - m)."""

from __future__ import annotations

from torch import Tensor

from marginlab.checks import check_float
from marginlab.heads.base import CosineMarginHead
from marginlab.heads.probe import ProbeMargin


class AMSoftmaxHead(CosineMarginHead):
    """Additive cosine margin; ``cosface`` is the same head under its other name (CosFace has no official
    code: it gets AM-Softmax's initialisation, Caffe xavier, with ``init=official``)."""

    # happynear/AMSoftmax prototxt/face_train_test.prototxt: fc6_l2 weight_filler xavier (Caffe, fan_in)
    official_init = "caffe_xavier"

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.35, **common):
        super().__init__(in_features, num_classes, s=s, **common)
        self.m = check_float("m", m, low=0.0, high=2.0)
        self.probe_margin = ProbeMargin(m3=self.m)  # additive cosine margin

    precise_target = False  # slope 1: rounding in cos theta_y moves the logit no more than any other's

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, float]:
        # AM-Softmax eq. 3: psi(theta) = cos(theta) - m
        return cos_target - self.m, 1.0
