"""``EpochMeter``: the epoch's loss and accuracy sums, against hand-computed values."""

from __future__ import annotations

import torch

from marginlab.training.epoch_meter import EpochMeter


def test_sums_the_batch_weighted_loss_the_correct_predictions_and_the_images():
    meter = EpochMeter("cpu", classifies=True)
    meter.update(torch.tensor(2.0), torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    meter.update(torch.tensor(0.5), torch.tensor([3]), torch.tensor([3]))
    assert meter.totals(lambda t: t) == (2.0 * 3 + 0.5 * 1, 3.0, 4.0)


def test_a_criterion_that_does_not_classify_counts_no_correct_prediction():
    meter = EpochMeter("cpu", classifies=False)
    meter.update(torch.tensor(1.5), None, torch.tensor([0, 1]))
    assert meter.totals(lambda t: t) == (3.0, 0.0, 2.0)


def test_the_totals_go_through_the_ranks_sum_once():
    meter, calls = EpochMeter("cpu", classifies=True), []
    meter.update(torch.tensor(1.0), torch.tensor([1]), torch.tensor([1]))
    assert meter.totals(lambda t: calls.append(t.dtype) or t * 2) == (2.0, 2.0, 2.0)
    assert calls == [torch.float64]
