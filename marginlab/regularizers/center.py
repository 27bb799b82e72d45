"""Center loss (Wen, Zhang, Li, Qiao, ECCV 2016): pull each feature towards its class centre."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.regularizers.base import Regularizer


class CenterLoss(Regularizer):
    """``weight * sum_i ||x_i - c_{y_i}||^2 / (2 B)`` with centres kept in a buffer.

    The batch mean follows the official Caffe CenterLossLayer (ydwen/caffe-face,
    ``loss = dot / M_ / 2``), so the gradient is ``weight * (x_i - c_{y_i}) / B``. The centres are
    a buffer, not a Parameter: the optimizer never sees them. Each training forward first computes
    the loss with the current centres, then moves them by the paper's rule (eq. 4 and Algorithm 1)
    ``delta c_j = sum_{i: y_i = j} (c_j - x_i) / (1 + n_j)``, ``c_j <- c_j - alpha delta c_j``.
    Centres start Xavier-uniform, U(+-sqrt(3 / D)), the filler of the official face example.
    Defaults lambda = 0.003, alpha = 0.5 are the paper's face setting (its MNIST example uses
    lambda 0.01); the released face prototxt uses loss_weight 0.008 with solver-updated centres.
    """

    def __init__(self, in_features: int, num_classes: int, weight: float = 0.003, alpha: float = 0.5):
        super().__init__(in_features, num_classes, weight)
        self.alpha = check_float("alpha", alpha, low=0.0, high=1.0)
        bound = math.sqrt(3.0 / in_features)
        self.register_buffer("centers", torch.empty(num_classes, in_features).uniform_(-bound, bound))

    def forward(self, embeddings: Tensor, labels: Tensor, logits: Tensor | None = None) -> Tensor:
        self._check_inputs(embeddings, labels)
        x = at_least_float32(embeddings)
        diff = x - self.centers[labels].to(x.dtype)
        # Center loss eq. 2 with the Caffe layer's batch mean: L_C = sum_i ||x_i - c_{y_i}||^2 / (2 B)
        loss = self.weight * diff.pow(2).sum() / (2 * x.shape[0])
        if self.training:
            self._update_centers(diff.detach(), labels)
        return loss

    @torch.no_grad()
    def _update_centers(self, diff: Tensor, labels: Tensor) -> None:
        counts = torch.bincount(labels, minlength=self.num_classes).to(self.centers.dtype)
        # Center loss eq. 4: c_j <- c_j - alpha sum_{y_i=j} (c_j - x_i) / (1 + n_j)
        step = diff.to(self.centers.dtype) * (self.alpha / (1.0 + counts[labels])).unsqueeze(1)
        self.centers.index_add_(0, labels, step)
