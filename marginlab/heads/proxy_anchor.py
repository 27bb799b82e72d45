"""Proxy-Anchor (Kim et al., CVPR 2020): each proxy (a row of ``weight``) anchors its positives and negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marginlab.checks import check_float
from marginlab.heads.base import MarginHead
from marginlab.heads.output import HeadLoss


def log1p_sum_exp(values: Tensor, keep: Tensor) -> Tensor:
    """log(1 + sum_i exp(values_ic)) over the kept rows i of each column c (C); 0 for a column with none."""
    masked = values.masked_fill(~keep, float("-inf"))
    zeros = masked.new_zeros(1, masked.shape[1])  # the 1 inside the log, as exp(0)
    return torch.logsumexp(torch.cat([masked, zeros]), dim=0)


class ProxyAnchorHead(MarginHead):
    """A loss of its own, Proxy-Anchor's eq. 4 on cosines s(x, p) of unit vectors (``weight``: the C x D proxies):

    ``(1/|P+|) sum_{p in P+} log(1 + sum_{x in X_p+} e^(-alpha (s(x, p) - delta)))
    + (1/|P|) sum_{p in P} log(1 + sum_{x in X_p-} e^(alpha (s(x, p) + delta)))``,

    P+ the proxies with a positive in the batch, X_p+ / X_p- the batch's samples of / not of p's class.
    Ported from tjddus9597/Proxy-Anchor-CVPR2020 code/losses.py ``Proxy_Anchor`` (commit
    51db57031e38f75c03f69bbdfad1a3233afd9787), computed as pytorch-metric-learning's ``ProxyAnchorLoss`` does
    (v2.9.0, a log-sum-exp with a 0 appended: the official ``log(1 + sum exp)`` overflows float32 sooner).
    Defaults are the official train.py's: ``margin`` delta 0.1 (a cosine), ``alpha`` 32, and the proxies learn at
    100 times the backbone's rate (the config's ``lr_mult: 100``). W starts as the
    official ``kaiming_normal_(mode='fan_out')``, N(0, 2 / C). The official normalises with ``x / sqrt(||x||^2 +
    1e-12)``, PML and this head with ``x / max(||x||, eps)``: equal for any feature norm above 1e-6.
    ``head(x)`` scores the cosines (PML's ``get_logits``). It has no cosine margin on the softmax of one sample:
    the margin advisor has nothing to check.
    """

    produces_loss = True
    normalized_features = True  # it compares x / ||x|| with p / ||p||
    # tjddus9597/Proxy-Anchor-CVPR2020 code/losses.py: nn.init.kaiming_normal_(self.proxies, mode='fan_out')
    official_init = "kaiming_normal_fan_out"

    def __init__(self, in_features: int, num_classes: int, margin: float = 0.1, alpha: float = 32.0, **common):
        super().__init__(in_features, num_classes, **common)
        self.margin = check_float("margin", margin, low=0.0, high=1.0)
        self.alpha = check_float("alpha", alpha, low=0.0, low_inclusive=False)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        return self.normalized_cosine(embeddings)

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        cos = self.normalized_cosine(embeddings)  # B x C
        positive = F.one_hot(labels.long(), self.num_classes).bool()
        # Proxy-Anchor eq. 4, positive term: log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta))) per proxy
        pos = log1p_sum_exp(-self.alpha * (cos - self.margin), positive)
        # negative term: log(1 + sum_{x in X_p-} exp(alpha (s(x, p) + delta))) per proxy
        neg = log1p_sum_exp(self.alpha * (cos + self.margin), ~positive)
        with_positives = positive.any(dim=0).sum()  # |P+|
        loss = pos.sum() / with_positives + neg.sum() / self.num_classes
        return HeadLoss(loss, cos.detach().argmax(1))
