"""NormFace (Wang et al., ACM MM 2017): logits s cos(theta_j) with normalised features and weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from marginlab.heads.base import CosineMarginHead
from marginlab.heads.output import HeadLoss

#: the learnt scale's lower bound (NormFace prototxt/scaled_cosine_softmax.prototxt: min_value 0.01)
MIN_SCALE = 0.01


class NormFaceHead(CosineMarginHead):
    """s * cos(theta_j) for every class, no margin.

    ``learnable_scale=True`` makes s an ``nn.Parameter`` initialised to ``s`` (NormFace's repo learns
    it, init 10); it is reported by ``schedule_values()``. As in the official prototxt (happynear/NormFace
    prototxt/scaled_cosine_softmax.prototxt, ``scale_param { min_value: 0.01 }``) the learnt s is kept
    at >= 0.01: it is clamped in place before every training forward. The same prototxt trains the class weights
    with ``lr_mult: 100, decay_mult: 0``: ``head.lr_mult=100 head.weight_decay=0`` (MarginHead).
    s = 1 is Cosine Normalization's plain cosine (configs/head/cosine.yaml). COCO (congenerous cosine, Liu et al.
    2017) is literally this formula,
    ``alpha * x/||x|| . c_k/||c_k||`` with learnable centroids c_k = W_k, so configs/head/coco.yaml
    points here rather than at a copy.
    """

    # happynear/NormFace prototxt/scaled_cosine_softmax.prototxt: weight_filler gaussian_unitball
    # (happynear's Caffe GaussianUnitBallFiller: N(0, 1), then every row to unit norm)
    official_init = "gaussian_unit_rows"

    def __init__(self, in_features: int, num_classes: int, s: float = 16.0, learnable_scale: bool = False, **common):
        super().__init__(in_features, num_classes, s=s, **common)
        self.learnable_scale = bool(learnable_scale)
        if self.learnable_scale:
            # NormFace: the scale is a trained scalar layer
            self.s = nn.Parameter(torch.tensor(self.s))

    precise_target = False  # no margin: the target logit is s cos theta_y like every other

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, float]:
        return cos_target, 1.0

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, *, stats: bool = False) -> Tensor | HeadLoss:
        if self.learnable_scale and self.training:  # (only training steps change s)
            with torch.no_grad():  # NormFace prototxt, cosine_scale: min_value 0.01
                self.s.clamp_(min=MIN_SCALE)
        return super().forward(embeddings, labels, stats=stats)

    def schedule_values(self) -> dict[str, float]:
        return {"s": float(self.s.detach())} if self.learnable_scale else {}
