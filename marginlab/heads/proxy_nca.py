"""ProxyNCA (Movshovitz-Attias et al., ICCV 2017): NCA with one proxy per class, the proxies being ``weight``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marginlab.checks import check_float
from marginlab.heads.base import MarginHead
from marginlab.heads.output import HeadLoss


class ProxyNCAHead(MarginHead):
    """A loss of its own: ``-log softmax_j(-scale ||x^ - p^_j||^2)`` at the label, x^ and the proxies p^_j = W_j
    unit vectors (``weight`` is the C x D proxy matrix).

    There is no official code (Google's paper); this is pytorch-metric-learning's ``ProxyNCALoss`` (v2.9.0,
    losses/proxy_losses.py on losses/nca_loss.py: ``LpDistance(power=2)`` of normalised vectors,
    ``softmax_scale``), which ProxyNCA++ (Teh et al., ECCV 2020) also uses: the softmax runs over every proxy,
    the positive included. ``exclude_positive=True`` is the ProxyNCA paper's eq.: the denominator sums the
    negative proxies only (the loss is then unbounded below). ``softmax_scale`` is 1/T, the inverse temperature;
    the config's 32 is the ProxyNCA baseline of Proxy-Anchor's official code (tjddus9597/Proxy-Anchor-CVPR2020
    code/losses.py ``Proxy_NCA``, commit 51db57031e38f75c03f69bbdfad1a3233afd9787); PML's own default is 1.
    For unit vectors ``||x^ - p^||^2 = 2 - 2 cos``, so the loss is cross-entropy on ``2 scale cos``: NormFace
    with s = 2 scale. PML drops from its mean a row whose positive probability underflows to exactly 0
    (``-log 0``); here such a row keeps its finite loss (log-softmax). W starts N(0, 1) (PML's
    ``torch.nn.init.normal_``). ``head(x)`` scores ``-scale ||x^ - p^_j||^2`` (PML's ``get_logits``, negated).
    It has no cosine margin: the margin advisor has nothing to check.
    """

    produces_loss = True
    normalized_features = True  # it compares x / ||x|| with p / ||p||
    # pytorch-metric-learning WeightMixin default: torch.nn.init.normal_ (N(0, 1))
    official_init = "normal_1"

    def __init__(
        self, in_features: int, num_classes: int, softmax_scale: float = 32.0, exclude_positive: bool = False, **common
    ):
        super().__init__(in_features, num_classes, **common)
        self.softmax_scale = check_float("softmax_scale", softmax_scale, low=0.0, low_inclusive=False)
        self.exclude_positive = bool(exclude_positive)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        # ProxyNCA: -d(x, p_j) = -||x^ - p^_j||^2 = 2 cos theta_j - 2 (unit vectors), times the softmax scale
        return self.softmax_scale * (2.0 * self.normalized_cosine(embeddings) - 2.0)

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        scores = self.logits(embeddings, None)
        if self.exclude_positive:
            # ProxyNCA paper: -log(exp(-d(x, p_y)) / sum_{z != y} exp(-d(x, p_z)))
            target = scores.gather(1, labels.view(-1, 1)).squeeze(1)
            others = scores.scatter(1, labels.view(-1, 1), float("-inf"))
            per_row = torch.logsumexp(others, dim=1) - target
        else:
            # PML / ProxyNCA++: -log softmax over all proxies, at the label
            per_row = F.cross_entropy(scores, labels, reduction="none")
        return HeadLoss(per_row.mean(), scores.detach().argmax(1))
