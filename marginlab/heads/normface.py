"""NormFace (Wang et al., ACM MM 2017): logits s cos(theta_j) with normalised features and weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from marginlab.heads.base import CosineMarginHead


class NormFaceHead(CosineMarginHead):
    """s * cos(theta_j) for every class, no margin.

    ``learnable_scale=True`` makes s an ``nn.Parameter`` initialised to ``s`` (NormFace's repo learns
    it, init 10); it is reported by ``schedule_values()``. s = 1 is Cosine Normalization's plain cosine
    (configs/head/cosine.yaml). COCO (congenerous cosine, Liu et al. 2017) is literally this formula,
    ``alpha * x/||x|| . c_k/||c_k||`` with learnable centroids c_k = W_k, so configs/head/coco.yaml
    points here rather than at a copy.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 16.0,
                 learnable_scale: bool = False):
        super().__init__(in_features, num_classes, s=s)
        self.learnable_scale = bool(learnable_scale)
        if self.learnable_scale:
            # NormFace: the scale is a trained scalar layer
            self.s = nn.Parameter(torch.tensor(self.s))

    precise_target = False  # no margin: the target logit is s cos theta_y like every other

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, float]:
        return cos_target, 1.0

    def schedule_values(self) -> dict[str, float]:
        return {"s": float(self.s.detach())} if self.learnable_scale else {}
