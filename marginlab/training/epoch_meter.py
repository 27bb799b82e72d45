"""The training epoch's loss and accuracy as one meter: summed on the device each step (no sync), over the ranks
once at the end of the epoch."""

from __future__ import annotations

import torch
from torch import Tensor


class EpochMeter:
    """Sums each step's mean loss times its batch size, the correct predictions (when the criterion
    ``classifies``: every class scored on this rank) and the images seen."""

    def __init__(self, device: torch.device | str, classifies: bool):
        self.classifies = classifies
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def update(self, loss: Tensor, predicted: Tensor | None, labels: Tensor) -> None:
        self.loss_sum += loss.detach() * labels.numel()  # accumulated on the device: no sync
        if self.classifies:
            self.correct += (predicted == labels).sum()
        self.seen += labels.numel()

    def totals(self, all_reduce_sum) -> tuple[float, float, float]:
        """(loss sum, correct, images) over the ranks (``all_reduce_sum``: DistContext's), in float64: one sync."""
        device = self.loss_sum.device
        seen = torch.tensor(float(self.seen), device=device, dtype=torch.float64)
        totals = all_reduce_sum(torch.stack([self.loss_sum.double(), self.correct.double(), seen]))
        return tuple(totals.tolist())
