"""The training loss as an object: ``loss = criterion(embeddings, labels)``, like pytorch-metric-learning's losses.

``MarginLoss(head)``: cross-entropy on a margin head's logits + regularizers + the head's own term (MagFace's g).
``PartialFCLoss(pfc)``: the same for a Partial FC head, whose output is already the (distributed) cross-entropy.
Both offer the engine one interface (``step``: the loss, predictions and step statistics of a head's output;
``classifies``, ``sharded``, ...), so neither the loop nor ``train()`` asks which head it trains;
``criterion_for(model)`` picks the one a built model needs.
"""

from __future__ import annotations

from marginlab.distributed.partial_fc import PartialFC
from marginlab.losses.margin import CriterionStep, MarginLoss
from marginlab.losses.partial_fc import PartialFCLoss

__all__ = ["CriterionStep", "MarginLoss", "PartialFCLoss", "criterion_for"]


def criterion_for(model) -> MarginLoss:
    """The loss of a built ``MarginModel``: its head's and regularizers' (the same modules, not copies)."""
    if isinstance(model.head, PartialFC):  # no rank holds all the logits
        return PartialFCLoss(model.head, model.regularizers)
    return MarginLoss(model.head, model.regularizers)
