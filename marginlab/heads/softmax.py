"""Plain softmax head: logits W x + b (the baseline every margin paper compares against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.dtypes import at_least_float32
from marginlab.heads.base import MarginHead
from marginlab.heads.probe_record import LazyCosine


class SoftmaxHead(MarginHead):
    """Linear classifier; training and evaluation logits are the same, W x (+ b). No official code of its
    own: ``init=official`` is nn.Linear's kaiming_uniform(a = sqrt 5), the same as ``init=kaiming``."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, **common):
        super().__init__(in_features, num_classes, **common)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        logits = at_least_float32(F.linear(embeddings, self.weight, self.bias))  # float32 under autocast
        if not self.probe_record.enabled:
            return logits
        with torch.no_grad():  # cosines only for the geometry probe: cos = (logits - b) / (||W|| ||x||),
            # computed from these pieces (taken now: the step may change W and b) when probe_record.cosine is read
            x_norms = torch.linalg.vector_norm(at_least_float32(embeddings.detach()), dim=1)
            w_norms = torch.linalg.vector_norm(self.weight.detach(), dim=1, dtype=logits.dtype)
            self.probe_record.keep(
                LazyCosine(
                    logits,
                    row_scale=x_norms.clamp_min_(1e-12).reciprocal_(),
                    col_scale=w_norms.clamp_min_(1e-12).reciprocal_(),
                    bias=None if self.bias is None else self.bias.detach().to(logits.dtype, copy=True),
                )
            )
        return logits
