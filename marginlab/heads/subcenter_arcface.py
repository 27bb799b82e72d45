"""Sub-center ArcFace (Deng et al., ECCV 2020): K sub-centres per class, cosine max-pooled, ArcFace margin."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from marginlab.checks import check_positive_int
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.kernels import fused_linear, normalize_features, precise_cosine


class SubCenterArcFaceHead(ArcFaceHead):
    """``weight`` has ``num_classes * k`` rows; rows ``c*k .. c*k + k - 1`` are class c's sub-centres.

    The class cosine is the max over its k sub-centre cosines (Sub-center ArcFace, sub-class-wise max pooling:
    ``cos theta_{i,j} = max_k cos theta_{i,j,k}``); the margin is ArcFace's with its ``mode``. The
    default ``mode="no_fallback"`` is the official code's (insightface recognition/subcenter_arcface/
    train_parall.py: arccos, + m, cos, differentiated, no threshold); ``mode="exact"`` adds ArcFace's
    theta + m > pi fallback (and allows ``easy_margin``), ``straight_through`` is arcface_torch's.
    The target cosine is the max over the class's k sub-centres taken in float64 from the B x k target
    rows (``precise_target``), its gradient going to the chosen sub-centre.
    ``k = 1`` is ArcFace. The paper's later step (drop non-dominant sub-centres and noisy samples,
    then retrain) is an offline procedure and not part of the head. Note that ``weight`` is not
    C x D here: a probe that reads class prototypes from it sees C*k rows.
    """

    # insightface recognition/subcenter_arcface/parall_module_local_v1.py: fc7 weights mx.init.Normal(0.01)
    official_init = "normal_0.01"
    chunked_max_pools_sub_centers = True  # (base.py: chunked takes the max over the k rows itself)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.5,
        k: int = 3,
        easy_margin: bool = False,
        mode: str = "no_fallback",
        **common,
    ):
        super().__init__(in_features, num_classes, s=s, m=m, easy_margin=easy_margin, mode=mode, **common)
        self.k = check_positive_int("k", k)
        self.weight = nn.Parameter(torch.empty(num_classes * self.k, in_features))
        self.reset_weight()

    def normalized_cosine(self, embeddings: Tensor) -> Tensor:
        cos_all = super().normalized_cosine(embeddings)  # B x (C k)
        # Sub-center ArcFace, max pooling: max-pool the cosines over each class's k sub-centres -> B x C
        return cos_all.view(cos_all.shape[0], self.num_classes, self.k).amax(dim=2)

    def cosine_and_target(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        k = self.k
        rows = labels.long().unsqueeze(1) * k + torch.arange(k, device=labels.device)  # B x k: class y's rows
        with torch.no_grad():
            # Sub-center ArcFace, max pooling, for the target class: in float64 from its k rows
            sub = precise_cosine(embeddings.repeat_interleave(k, dim=0), self.weight, rows.flatten()).view(-1, k)
            best, chosen = sub.max(dim=1)
            chosen = rows.gather(1, chosen.unsqueeze(1)).squeeze(1)
        # the chosen sub-centre's entry is the target (precise value, exact gradient); the B x C max-pool's
        # target entries hold the product's value and are overwritten by the caller
        fused = fused_linear(
            normalize_features(embeddings), self.weight, chosen, normalize_weight=True, bound=1.0, target_value=best
        )
        cos = fused.logits.view(embeddings.shape[0], self.num_classes, k).amax(dim=2)
        return cos, fused.target
