"""CurricularFace (Huang et al., CVPR 2020): ArcFace target plus adaptively re-weighted hard negatives."""

from __future__ import annotations

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.base import cos_plus_angle
from marginlab.heads.kernels import ChunkedMargin, with_slope
from marginlab.heads.target_margin import Margin, StepMargin, chunked, margin_logits


class CurricularFaceHead(ArcFaceHead):
    """ArcFace's target ``s cos(theta_y + m)`` (with its theta + m > pi fallback) and, for every
    hard negative (``cos theta_j > cos(theta_y + m)``), the logit ``s cos theta_j (t + cos theta_j)``.

    ``t`` is a buffer (saved in the state dict): an exponential moving average of the batch-mean
    target cosine, ``t <- momentum * mean(cos theta_y) + (1 - momentum) * t``, updated in training
    forwards before it is applied, as in the official code (HuangYG123/CurricularFace,
    head/metrics.py, momentum 0.01, t starts at 0). Early in training t is small and hard negatives
    are damped; as t grows they are emphasised. The hard-negative test uses the raw cos(theta_y + m)
    as the official code does; the mask is the one B x C tensor this head builds (a comparison,
    no one-hot, no acos). The target cosine is taken in float64 from the B target rows
    (``cosine_and_target``), not from the (possibly bf16) product.
    """

    # HuangYG123/CurricularFace head/metrics.py: nn.init.normal_(self.kernel, std=0.01)
    official_init = "normal_0.01"

    def __init__(
        self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5, momentum: float = 0.01, **common
    ):
        super().__init__(in_features, num_classes, s=s, m=m, easy_margin=False, **common)
        self.momentum = check_float("momentum", momentum, low=0.0, high=1.0, low_inclusive=False)
        self.register_buffer("t", torch.zeros(1))

    def update_t(self, cos_target: Tensor) -> None:
        """Training forwards: t <- momentum * mean(cos theta_y) + (1 - momentum) * t, before t is applied."""
        if self.training:
            with torch.no_grad():
                # CurricularFace, EMA of r = mean positive cosine: t = a r + (1 - a) t
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * cos_target.detach().mean())

    def target_margin(self, embeddings: Tensor) -> StepMargin:
        """ArcFace's target, and the hard negatives' cos theta_j (t + cos theta_j); updates t once a step."""

        def margin(cos_target: Tensor) -> Margin:
            # CurricularFace, N(t, cos theta_j): j is a hard negative when cos(theta_y + m) < cos theta_j
            boundary = cos_plus_angle(cos_target.detach(), self.cos_m, self.sin_m).unsqueeze(1)
            self.update_t(cos_target)
            t = self.t.to(cos_target.dtype)

            def hard_negatives(cos: Tensor) -> Tensor:
                # CurricularFace, hard case of N(t, cos theta_j): cos theta_j (t + cos theta_j) for hard negatives
                return torch.where(cos.detach() > boundary, cos * (t + cos), cos)

            return Margin(with_slope(cos_target, self.margin_and_slope), hard_negatives)

        return margin

    def chunked_margin(self, embeddings: Tensor) -> ChunkedMargin:
        """The chunked loss's margin, built from ``target_margin`` (heads/target_margin.py)."""
        return chunked(self.target_margin(embeddings))

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            cos = self.normalized_cosine(embeddings)
            return cos * self.s
        cos, cos_target = self.cosine_and_target(embeddings, labels)  # the target in float64
        return margin_logits(cos, cos_target, labels, self.s, self.target_margin(embeddings))

    def schedule_values(self) -> dict[str, float]:
        return {"t": float(self.t.item())}
