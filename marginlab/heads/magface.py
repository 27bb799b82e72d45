"""MagFace (Meng et al., CVPR 2021): angular margin growing with the feature magnitude, plus g(a)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.heads.base import CosineMarginHead, cos_plus_angle
from marginlab.heads.kernels import ChunkedMargin
from marginlab.heads.probe import ProbeMargin
from marginlab.heads.target_margin import Margin, StepMargin, chunked, margin_logits


class MagFaceHead(CosineMarginHead):
    """Target logit ``s cos(theta_y + m(a))`` with ``a = ||f||`` clipped to [l_a, u_a] and
    ``m(a) = (u_m - l_m) / (u_a - l_a) (a - l_a) + l_m``; others ``s cos theta_j``.

    The magnitude keeps its gradient (through m(a) and through g). The regulariser
    ``lambda_g * mean(g(a))``, ``g(a) = a / u_a^2 + 1 / a``, is computed in each training forward
    and returned by ``extra_loss()`` (None after an evaluation forward); the engine adds it to the
    loss. ``easy_margin=True`` (the official MagLinear default: margin only where cos theta > 0);
    ``easy_margin=False`` uses ArcFace's threshold cos(pi - m(a)) and fallback cos theta - m(a) sin m(a).
    Defaults are the official run/run.sh (IrvingMeng/MagFace): l_a 10, u_a 110, l_m 0.45, u_m 0.8,
    lambda_g 35, s 64. With l_m = u_m = 0 and lambda_g = 0 the head is NormFace.
    The probe counts angular violations with the smallest margin l_m. The target cosine is taken in
    float64 from the B target rows (``cosine_and_target``), not from the (possibly bf16) product.
    """

    # IrvingMeng/MagFace models/magface.py: weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5) (unit rows)
    official_init = "uniform_unit_rows"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
        **common,
    ):
        super().__init__(in_features, num_classes, s=s, **common)
        self.l_a = check_float("l_a", l_a, low=0.0, low_inclusive=False)
        self.u_a = check_float("u_a", u_a, low=self.l_a, low_inclusive=False)
        self.l_m = check_float("l_m", l_m, low=0.0, high=math.pi / 2)
        self.u_m = check_float("u_m", u_m, low=self.l_m, high=math.pi / 2)
        self.probe_margin = ProbeMargin(m2=self.l_m)  # angular, with the smallest magnitude-aware margin l_m
        self.lambda_g = check_float("lambda_g", lambda_g, low=0.0)
        self.easy_margin = bool(easy_margin)
        self._loss_g: Tensor | None = None

    def magnitude_margin(self, a: Tensor) -> Tensor:
        # MagFace, magnitude-aware margin (linear): m(a) = (u_m - l_m)/(u_a - l_a) (a - l_a) + l_m
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def regularizer_g(self, a: Tensor) -> Tensor:
        # MagFace, regulariser g in L_Mag: g(a) = a / u_a^2 + 1 / a
        return a / (self.u_a**2) + 1.0 / a

    def target_and_fallback(self, cos_target: Tensor, phi: Tensor, margin: Tensor) -> Tensor:
        """The target cosine: phi where cos theta > 0 (easy margin) or cos theta > cos(pi - m), else cos theta
        (easy) or ArcFace's fallback cos theta - sin(pi - m) m."""
        if self.easy_margin:
            return torch.where(cos_target > 0, phi, cos_target)
        # ArcFace exact-gradient fallback with the per-sample margin: cos theta - sin(pi - m) m
        keep = cos_target > torch.cos(math.pi - margin)
        return torch.where(keep, phi, cos_target - torch.sin(math.pi - margin) * margin)

    def magnitude(self, embeddings: Tensor) -> Tensor:
        """a = ||f|| clipped to [l_a, u_a], with its gradient; sets the regulariser's term in training."""
        a = torch.linalg.vector_norm(at_least_float32(embeddings), dim=1).clamp(self.l_a, self.u_a)
        self._loss_g = self.lambda_g * self.regularizer_g(a).mean() if self.training else None
        return a

    def target_margin(self, embeddings: Tensor) -> StepMargin:
        """The target cos(theta_y + m(a)); m(a) keeps its gradient to ||f||; sets the regulariser's term."""
        m = self.magnitude_margin(self.magnitude(embeddings))

        def margin(cos_target: Tensor) -> Margin:
            m_t = m.to(cos_target.dtype)
            # MagFace, L_Mag target: cos(theta_y + m(a_i)) (official MagLinear, cos m / sin m per sample)
            phi = cos_plus_angle(cos_target, torch.cos(m_t), torch.sin(m_t))
            return Margin(self.target_and_fallback(cos_target, phi, m_t))

        return margin

    def chunked_margin(self, embeddings: Tensor) -> ChunkedMargin:
        """The chunked loss's margin, built from ``target_margin`` (heads/target_margin.py)."""
        return chunked(self.target_margin(embeddings))

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            cos = self.normalized_cosine(embeddings)
            self._loss_g = None
            return cos * self.s
        cos, cos_target = self.cosine_and_target(embeddings, labels)  # the target in float64
        return margin_logits(cos, cos_target, labels, self.s, self.target_margin(embeddings))

    def extra_loss(self) -> Tensor | None:
        """lambda_g * mean(g(a)) from the last training forward; None after an evaluation forward."""
        return self._loss_g
