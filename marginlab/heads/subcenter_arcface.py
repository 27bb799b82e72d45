"""Sub-center ArcFace (Deng et al., ECCV 2020): K sub-centres per class, cosine max-pooled, ArcFace margin."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.base import check_positive_int


class SubCenterArcFaceHead(ArcFaceHead):
    """``weight`` has ``num_classes * k`` rows; rows ``c*k .. c*k + k - 1`` are class c's sub-centres.

    The class cosine is the max over its k sub-centre cosines (Sub-center ArcFace, sub-class-wise max pooling:
    ``cos theta_{i,j} = max_k cos theta_{i,j,k}``); the margin is ArcFace's, inherited unchanged.
    ``k = 1`` is ArcFace. The paper's later step (drop non-dominant sub-centres and noisy samples,
    then retrain) is an offline procedure and not part of the head. Note that ``weight`` is not
    C x D here: a probe that reads class prototypes from it sees C*k rows.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5,
                 k: int = 3, easy_margin: bool = False):
        super().__init__(in_features, num_classes, s=s, m=m, easy_margin=easy_margin)
        self.k = check_positive_int("k", k)
        self.weight = nn.Parameter(torch.empty(num_classes * self.k, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # same init as the base head

    def normalized_cosine(self, embeddings: Tensor) -> Tensor:
        cos_all = super().normalized_cosine(embeddings)  # B x (C k)
        # Sub-center ArcFace, max pooling: max-pool the cosines over each class's k sub-centres -> B x C
        return cos_all.view(cos_all.shape[0], self.num_classes, self.k).amax(dim=2)
