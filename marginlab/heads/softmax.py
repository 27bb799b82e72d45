"""Plain softmax head: logits W x + b (the baseline every margin paper compares against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.heads.base import MarginHead


class SoftmaxHead(MarginHead):
    """Linear classifier; training and evaluation logits are the same, W x (+ b)."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__(in_features, num_classes)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        logits = F.linear(embeddings, self.weight, self.bias)
        with torch.no_grad():  # cosines only for the geometry probe: cos = W x / (||W|| ||x||)
            norms = embeddings.float().norm(dim=1, keepdim=True) * self.weight.float().norm(dim=1)
            plain = logits.float() if self.bias is None else logits.float() - self.bias.float()
            self.last_cosine = (plain / norms.clamp_min(1e-12)).clamp(-1.0, 1.0)
        return logits
