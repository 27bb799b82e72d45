"""The regularizer contract: ``reg(embeddings, labels, logits)`` returns the WEIGHTED scalar loss.

The builder passes ``in_features`` (D) and ``num_classes`` (C) next to the config's keys
(``hydra.utils.instantiate(cfg.regularizer.<name>, in_features=D, num_classes=C)``); the engine
adds each regularizer's return value to the loss. ``embeddings`` are the raw backbone features
(B x D), ``logits`` the head's output for the same batch (B x C). Regularizers that keep state
(center loss's centres) update it in training forwards only, and keep it in buffers.
"""

from __future__ import annotations

from torch import Tensor, nn

from marginlab.checks import check_batch, check_float, check_positive_int


class Regularizer(nn.Module):
    """Base of every regularizer; ``weight`` is the loss weight (lambda) applied inside ``forward``."""

    def __init__(self, in_features: int, num_classes: int, weight: float):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.weight = check_float("weight", weight, low=0.0)

    def forward(self, embeddings: Tensor, labels: Tensor, logits: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_inputs(self, embeddings: Tensor, labels: Tensor) -> None:
        check_batch(type(self).__name__, self.in_features, embeddings, labels)
