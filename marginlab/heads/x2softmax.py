"""X2-Softmax (Xu et al., arXiv 2312.05281, 2023): target logit s (a (theta_y - h)^2 + k), a quadratic in the angle."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.errors import ConfigError
from marginlab.heads.base import CosineMarginHead
from marginlab.heads.combined import _ACOS_EPS
from marginlab.heads.probe import ProbeMargin

#: how the gradient flows through the quadratic, see X2SoftmaxHead
MODES = ("straight_through", "exact")


@dataclass(frozen=True)
class QuadraticMargin(ProbeMargin):
    """X2-Softmax's margin as the probe and the margin advisor count it: a sample violates it when
    a (theta_y - h)^2 + k does not beat the nearest non-target cosine."""

    a: float = -0.9
    h: float = 0.0
    k: float = 0.65

    @property
    def enforced(self) -> bool:
        return True  # the target logit is never cos theta_y itself

    def violation(self, cos_target: Tensor, cos_other: Tensor) -> Tensor:
        theta_y = torch.acos(cos_target.clamp(-1.0, 1.0))
        # X2-Softmax eq. for the target logit: f(theta) = a (theta - h)^2 + k
        return self.a * (theta_y - self.h) ** 2 + self.k <= cos_other


class X2SoftmaxHead(CosineMarginHead):
    """Target logit ``s f(theta_y)``, ``f(theta) = a (theta - h)^2 + k``; others ``s cos theta_j``.

    Ported from XieZixiUSTC/X2-Softmax, loss.py ``X2Softmax`` (commit 9899232cb316495d78e4824384e1dda8efdea2f7),
    on the normalised ``my_CE_2`` of its backbones.py (W is C x D there too, drawn N(0, 0.01^2)).
    Defaults from its work.sh: ``--lossparameters 64 -0.9 -0.0 0.65`` = s, a, h, k.

    ``mode="straight_through"`` (default, the official code): under ``torch.no_grad()`` it takes ``arccos_`` of
    the gathered target cosines, evaluates f and writes it into the logits in place, so autograd never sees the
    quadratic: the forward value is s f(theta_y) and the gradient that of s cos theta_y (slope 1).
    ``mode="exact"``: the paper's loss differentiated, d f / d cos = -2 a (theta - h) / sin theta.

    f must fall with the angle on [0, pi] as cos does: a < 0 and h <= 0 (the official h is -0.0).
    The official code takes ``arccos`` of the unclamped product of normalised vectors, which gives NaN where
    rounding puts a target cosine above 1 (a feature parallel to its class weight); here the target cosine is
    clamped to [-1, 1] first. The probe and margin advisor count a violation where f(theta_y) <= cos theta_other.
    """

    # XieZixiUSTC/X2-Softmax backbones.py my_CE_2: torch.normal(0, 0.01, (num_classes, embedding_size))
    official_init = "normal_0.01"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        a: float = -0.9,
        h: float = 0.0,
        k: float = 0.65,
        mode: str = "straight_through",
        **common,
    ):
        super().__init__(in_features, num_classes, s=s, **common)
        self.a = check_float("a", a, high=0.0)
        if self.a == 0.0:  # f must fall with the angle
            raise ConfigError(f"a={a!r} is not allowed: it must lie in [-inf, 0)")
        self.h = check_float("h", h, low=-math.pi, high=0.0)
        self.k = check_float("k", k, low=-1.0, high=1.0)
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed: it must be one of {', '.join(MODES)}")
        self.mode = mode
        self.probe_margin = QuadraticMargin(a=self.a, h=self.h, k=self.k)

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, Tensor | float]:
        # clamped: the official arccos_ of a rounded cosine above 1 is NaN
        cos = cos_target.clamp(-1.0, 1.0)
        theta = torch.acos(cos)
        # X2-Softmax: f(theta) = a (theta - h)^2 + k
        value = self.a * (theta - self.h) ** 2 + self.k
        if self.mode == "straight_through":
            return value, 1.0  # the official no_grad edit: the gradient of cos theta
        # d f / d cos = 2 a (theta - h) d theta / d cos = -2 a (theta / sin theta - h / sin theta). Within eps of
        # cos = +-1 (as combined.py) theta / sin theta takes its limit 1 at cos = 1 and 0 at cos = -1, and h / sin
        # theta (unbounded as theta -> 0 for h < 0) is 0, so a step stays finite
        inside = cos.abs() <= 1.0 - _ACOS_EPS
        sin = (1.0 - cos * cos).clamp_min(_ACOS_EPS).sqrt()
        theta_over_sin = torch.where(inside, theta / sin, (cos > 0).to(cos.dtype))
        h_over_sin = torch.where(inside, self.h / sin, 0.0)
        return value, -2.0 * self.a * (theta_over_sin - h_over_sin)
