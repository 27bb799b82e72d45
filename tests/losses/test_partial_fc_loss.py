"""``PartialFCLoss``: Partial FC's distributed cross-entropy behind the same interface as ``MarginLoss``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from marginlab.distributed.partial_fc import PartialFC
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.softmax import SoftmaxHead
from marginlab.losses import MarginLoss, PartialFCLoss, criterion_for
from marginlab.regularizers.center import CenterLoss
from marginlab.training.builders import MarginModel


def test_one_process_partial_fc_gives_the_unsharded_loss():
    torch.manual_seed(0)
    head = AMSoftmaxHead(4, 5, s=10.0, m=0.2)
    pfc = PartialFC(copy.deepcopy(head), 5, sample_rate=1.0)
    center = CenterLoss(4, 5, weight=0.1)
    embeddings, labels = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 5
    expected = MarginLoss(head, [copy.deepcopy(center)])(embeddings, labels)
    criterion = criterion_for(MarginModel(nn.Identity(), pfc, nn.ModuleDict({"center": center})))
    assert type(criterion) is PartialFCLoss and not criterion.classifies and criterion.sharded
    assert criterion(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert criterion.margin_head is pfc.head  # what the margin check and the evaluation head use
    assert criterion.sharded_parameters() == [pfc.head.weight]


def test_its_sampling_step_travels_with_the_checkpoint():
    criterion = PartialFCLoss(PartialFC(AMSoftmaxHead(4, 5), 5, sample_rate=0.5))
    criterion(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]))
    assert criterion.checkpoint_entries() == {"partial_fc": {"step": 1}}
    fresh = PartialFCLoss(PartialFC(AMSoftmaxHead(4, 5), 5, sample_rate=0.5))
    fresh.restore_checkpoint_entries(criterion.checkpoint_entries(), step=7)
    assert fresh.head.step == 1
    fresh.restore_checkpoint_entries({}, step=7)  # a checkpoint written before the entry: the loop's step
    assert fresh.head.step == 7


def test_a_plain_head_is_refused_by_name():
    with pytest.raises(TypeError, match="PartialFCLoss\\(head=...\\).*SoftmaxHead.*use MarginLoss"):
        PartialFCLoss(SoftmaxHead(4, 3))
