"""``PartialFCLoss``: the training loss of a Partial FC head, whose output is already the distributed
cross-entropy of the global batch (a ``HeadLoss``, marginlab/distributed/partial_fc.py), + regularizers + the
head's own term."""

from __future__ import annotations

from torch import Tensor, nn

from marginlab.distributed.partial_fc import PartialFC
from marginlab.heads.output import StepStats
from marginlab.losses.margin import MarginLoss


class PartialFCLoss(MarginLoss):
    """``loss = criterion(embeddings, labels)`` with a ``PartialFC`` head (this rank's shard of the classes).

    No rank holds all the logits, so there is no training accuracy (``classifies`` False), no step statistics,
    and the head cannot evaluate: ``margin_head`` (the wrapped head) or an unsharded copy of it does.
    """

    classifies = False
    sharded = True

    def __init__(self, head: PartialFC, regularizers=None):
        if not isinstance(head, PartialFC):
            raise TypeError(
                f"PartialFCLoss(head=...) takes a marginlab.distributed.partial_fc.PartialFC; got "
                f"{type(head).__name__}: use MarginLoss for an unsharded head"
            )
        super().__init__(head, regularizers)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def cosine_stats(self, embeddings: Tensor, labels: Tensor) -> StepStats | None:
        """None: this rank's cosines are of a sampled shard of the classes."""
        return None

    @property
    def margin_head(self) -> nn.Module:
        return self.head.head

    def sharded_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def checkpoint_entries(self) -> dict:
        return {"partial_fc": {"step": self.head.step}}  # its negatives are drawn per (seed, rank, step)

    def restore_checkpoint_entries(self, checkpoint: dict, step: int) -> None:
        self.head.step = checkpoint.get("partial_fc", {}).get("step", step)
