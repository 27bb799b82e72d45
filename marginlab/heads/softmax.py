"""Plain softmax head: logits W x + b (the baseline every margin paper compares against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.dtypes import at_least_float32
from marginlab.heads.base import MarginHead
from marginlab.heads.probe import scaled_cosine


class SoftmaxHead(MarginHead):
    """Linear classifier; training and evaluation logits are the same, W x (+ b). No official code of its
    own: ``init=official`` is nn.Linear's kaiming_uniform(a = sqrt 5), the same as ``init=kaiming``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, **common):
        super().__init__(in_features, num_classes, **common)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        return at_least_float32(F.linear(embeddings, self.weight, self.bias))  # float32 under autocast

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        """cos = (logits - b) / (||W_j|| ||x||), from the evaluation logits."""
        logits = self.logits(embeddings, None)
        x_norms = torch.linalg.vector_norm(at_least_float32(embeddings), dim=1)
        w_norms = torch.linalg.vector_norm(self.weight, dim=1, dtype=logits.dtype)
        return scaled_cosine(
            logits,
            row_scale=x_norms.clamp_min_(1e-12).reciprocal_(),
            col_scale=w_norms.clamp_min_(1e-12).reciprocal_(),
            bias=None if self.bias is None else self.bias.to(logits.dtype, copy=True),
        )
