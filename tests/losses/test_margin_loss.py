"""``MarginLoss``: the trainer's loss as a library object (issues #15, #17)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import marginlab
from marginlab.errors import ConfigError
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.softmax import SoftmaxHead
from marginlab.losses import MarginLoss, PartialFCLoss, criterion_for
from marginlab.regularizers.center import CenterLoss
from marginlab.training.builders import MarginModel
from marginlab.training.engine import LoopOptions, LoopState, StepParts, train_one_epoch
from marginlab.training.precision import Precision


def batch(n=6, dim=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen) * 5, torch.arange(n) % classes


def test_the_loss_is_cross_entropy_on_the_heads_margin_logits():
    torch.manual_seed(0)
    head = ArcFaceHead(4, 3, s=16.0, m=0.3)
    reference = copy.deepcopy(head)
    embeddings, labels = batch()
    loss = MarginLoss(head)(embeddings, labels)
    assert torch.equal(loss, F.cross_entropy(reference(embeddings, labels).float(), labels))
    plain = F.cross_entropy(reference(embeddings).float(), labels)  # without labels: no margin
    assert loss > plain  # the margin makes the target harder


def test_magface_adds_its_own_regulariser():
    torch.manual_seed(0)
    head = MagFaceHead(4, 3, lambda_g=35.0)
    embeddings, labels = batch()
    loss = MarginLoss(head)(embeddings, labels)
    ce = F.cross_entropy(copy.deepcopy(head)(embeddings, labels).float(), labels)
    a = embeddings.norm(dim=1).clamp(head.l_a, head.u_a)
    g = 35.0 * (a / head.u_a**2 + 1 / a).mean()  # MagFace (Meng et al., CVPR 2021) eq. 5: g(a) = a / u_a^2 + 1 / a
    assert loss.item() == pytest.approx((ce + g).item(), rel=1e-6) and g > 0


@pytest.mark.parametrize("given", ["module", "list", "dict"])
def test_regularizers_add_their_weighted_terms(given):
    torch.manual_seed(0)
    head, center = SoftmaxHead(4, 3), CenterLoss(4, 3, weight=0.5)
    embeddings, labels = batch()
    expected_center = copy.deepcopy(center)(embeddings, labels)
    regs = {"module": center, "list": [center], "dict": {"center": center}}[given]
    loss = MarginLoss(head, regularizers=regs)(embeddings, labels)
    ce = F.cross_entropy(head(embeddings, labels).float(), labels)
    assert loss.item() == pytest.approx((ce + expected_center).item(), rel=1e-6) and expected_center > 0
    assert any(p is head.weight for p in MarginLoss(head, regs).parameters())  # the optimizer gets W


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: MarginLoss("arcface"), TypeError, ["MarginLoss(head=...)", "str"]),
        (lambda: MarginLoss(SoftmaxHead(4, 3), regularizers=3), TypeError, ["regularizers", "int"]),
        (lambda: MarginLoss(SoftmaxHead(4, 3), regularizers=[3]), TypeError, ["regularizers", "int"]),
        (
            lambda: MarginLoss(SoftmaxHead(4, 3))(torch.randn(6, 5), torch.zeros(6, dtype=torch.long)),
            ConfigError,
            ["embeddings of shape (6, 5)", "in_features=4"],
        ),
        (
            lambda: MarginLoss(SoftmaxHead(4, 3))(torch.randn(6, 4), torch.zeros(5, dtype=torch.long)),
            ConfigError,
            ["labels of shape (5,)", "(6,)"],
        ),
        (
            lambda: MarginLoss(SoftmaxHead(4, 3))(torch.randn(6, 4), torch.zeros(6)),
            ConfigError,
            ["labels must be integer class indices", "float32"],
        ),
        (
            lambda: MarginLoss(SoftmaxHead(4, 3))(torch.randn(2, 4), torch.tensor([0, 3])),
            ConfigError,
            ["labels hold class 3", "num_classes=3", "[0, 2]"],
        ),
        (
            lambda: MarginLoss(SoftmaxHead(4, 3))([[0.0] * 4], torch.tensor([0])),
            TypeError,
            ["embeddings must be a tensor"],
        ),
    ],
)
def test_a_wrong_argument_is_one_line_naming_it(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_criterion_for_a_model_shares_its_modules():
    model = MarginModel(nn.Linear(4, 4), SoftmaxHead(4, 3), nn.ModuleDict({"center": CenterLoss(4, 3)}))
    criterion = criterion_for(model)
    assert type(criterion) is MarginLoss and criterion.classifies and not criterion.sharded
    assert criterion.head is model.head and criterion.regularizers is model.regularizers
    assert criterion.margin_head is model.head and criterion.sharded_parameters() == []


def test_the_loop_trains_with_the_criterion_it_is_given():
    class Smoothed(MarginLoss):  # a user's own loss: label smoothing on the same logits
        calls = 0

        def from_head_output(self, embeddings, logits, labels):
            Smoothed.calls += 1
            return F.cross_entropy(logits.float(), labels, label_smoothing=0.1)

    torch.manual_seed(0)
    model = MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), SoftmaxHead(3, 2), nn.ModuleDict())
    loader = [
        (torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(i)), torch.tensor([0, 1, 0, 1, 1]))
        for i in range(3)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(
        StepParts(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), criterion=Smoothed(model.head)),
        loader,
        Precision(torch.device("cpu"), "32"),
        LoopState(),
        LoopOptions(grad_clip=1.0, max_nonfinite=3, channels_last=False, log_every=10),
    )
    assert Smoothed.calls == 3 and stats["nonfinite_steps"] == 0 and "acc" in stats


def test_neither_the_loop_nor_train_asks_which_head_it_trains():
    package = Path(marginlab.__file__).parent / "training"
    for name in ("engine.py", "train.py"):
        source = (package / name).read_text()
        assert "PartialFC" not in source and "returns_loss" not in source, name
    assert PartialFCLoss.sharded and not PartialFCLoss.classifies
