"""Feature Incay (Yuan, Yang, Zhang, 2017): reciprocal norm loss for correctly classified samples."""

from __future__ import annotations

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.regularizers.base import Regularizer


class FeatureIncay(Regularizer):
    """``weight * mean_i h_i / (||f_i||^2 + eps)``: grows the norm of features already classified right.

    ``h_i`` is 1 where ``argmax(logits_i) == y_i`` and 0 otherwise (the paper's reciprocal norm loss;
    happynear/caffe-windows' FeatureIncayLoss layer computes the same batch mean of 1 / ||f_i||^2, but
    without any eps: it declares ``epsilon = 1e-6`` and never uses it, so ``eps`` here is ours, to keep
    a zero feature finite). ``smooth: true``
    is a variant of ours, not the paper's: ``h_i = softmax(logits_i)[y_i]`` (the true-class
    probability), so the weight moves continuously instead of switching at the decision boundary.
    ``h`` is always detached: it only weighs the term. ``logits`` are whatever the engine passes
    (with a margin head, the training logits: a sample counts as correct only past the margin).
    Default weight 0.1 is our pick: the paper's lambda is [unverified].
    """

    def __init__(
        self, in_features: int, num_classes: int, weight: float = 0.1, eps: float = 1e-6, smooth: bool = False
    ):
        super().__init__(in_features, num_classes, weight)
        self.eps = check_float("eps", eps, low=0.0, low_inclusive=False)
        self.smooth = bool(smooth)

    def forward(self, embeddings: Tensor, labels: Tensor, logits: Tensor) -> Tensor:
        self._check_inputs(embeddings, labels)
        x = at_least_float32(embeddings)
        with torch.no_grad():
            if self.smooth:
                h = torch.softmax(at_least_float32(logits.detach()), dim=1)
                h = h.gather(1, labels.view(-1, 1)).squeeze(1)
            else:
                h = logits.detach().argmax(dim=1) == labels
        # Feature Incay, reciprocal norm loss: lambda (1/N) sum_i h(i) / (||f_i||^2 + eps)
        return self.weight * (h.to(x.dtype) / (x.pow(2).sum(dim=1) + self.eps)).mean()
