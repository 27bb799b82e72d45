"""The probe's statistics come from the cosines the forward already made (heads/probe.py ``logit_stats``): evaluation
reads them off the evaluation logits, a training step that logs geometry gets them with its logits
(``HeadScores``), so neither computes the B x C x D product a second time; heads whose logits are no map of their
cosines still ask ``cosine``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marginlab.geometry.stats import target_and_nearest_other
from marginlab.heads.output import HeadScores
from marginlab.heads.probe import logit_stats
from marginlab.losses import MarginLoss
from marginlab.training.builders import MarginModel
from marginlab.training.engine import evaluate
from marginlab.training.precision import Precision
from tests.heads.conftest import HEAD_CONFIGS, instantiate, make_batch

HEADS = sorted(p.stem for p in HEAD_CONFIGS.glob("*.yaml"))
#: the heads whose logits are s cos theta with the margin on the target alone: they read their own cosines
READS_OWN = {"adacos", "amsoftmax", "arcface", "coco", "combined", "cosface", "cosine", "elasticface", "normface"}
READS_OWN |= {"x2softmax"}


def no_second_product(head, monkeypatch):
    """Makes the head's ``cosine`` (the second B x C x D product) fail the test when called."""

    def refuse(*_args, **_kwargs):
        raise AssertionError(f"{type(head).__name__}.cosine called: the forward's cosines were not reused")

    monkeypatch.setattr(head, "cosine", refuse)


@pytest.mark.parametrize("name", HEADS)
def test_evaluation_statistics_off_the_logits_are_those_of_the_pure_cosine(name):
    head = instantiate(name).eval()
    x, y = make_batch(head)
    with torch.no_grad():
        stats = logit_stats(head, head(x), x, y)
        expected = target_and_nearest_other(head.cosine(x).float(), y)
    if name not in READS_OWN:
        assert stats is None  # no map from its logits: evaluation asks ``cosine``
        return
    assert torch.equal(stats.target, expected[0]) and torch.equal(stats.nearest_other, expected[1])


def test_evaluate_makes_no_second_product_and_logs_the_same_geometry(monkeypatch):
    torch.manual_seed(0)
    model = MarginModel(nn.Identity(), instantiate("amsoftmax", 8, 10), nn.ModuleDict())
    x, y = make_batch(model.head, batch=24)
    loader = [(x[:12], y[:12]), (x[12:], y[12:])]
    prec = Precision(torch.device("cpu"), "32")
    with monkeypatch.context() as patch:  # the old way: from the pure cosine
        patch.setattr("marginlab.training.engine.logit_stats", lambda *_: None)
        expected = evaluate(model, loader, prec, channels_last=False, probe_max_samples=20)
    no_second_product(model.head, monkeypatch)
    assert evaluate(model, loader, prec, channels_last=False, probe_max_samples=20) == expected


@pytest.mark.parametrize("name", sorted(READS_OWN))
def test_a_logging_step_reads_its_statistics_off_its_own_forward(name, monkeypatch):
    fixed = {"mode": "fixed"} if name == "adacos" else {}  # (dynamic AdaCos: the next test)
    head = instantiate(name, **fixed).train()
    x, y = make_batch(head)
    twin = instantiate(name, **fixed).train()
    twin.load_state_dict(head.state_dict())
    plain = twin(x, y)
    output = head(x, y, stats=True)
    assert isinstance(output, HeadScores)
    assert torch.equal(output.logits, plain)  # the training logits are unchanged
    cos = head.cosine(x)
    no_second_product(head, monkeypatch)
    step = MarginLoss(head).step(x, output, y, stats=True)
    torch.testing.assert_close(step.loss, MarginLoss(twin).step(x, plain, y).loss, rtol=0, atol=0)
    # the forward's own product (and its target cosine in float64): the pure cosine's up to rounding
    target, other = target_and_nearest_other(cos.float(), y)
    torch.testing.assert_close(step.stats.target, target, rtol=0, atol=1e-6)
    torch.testing.assert_close(step.stats.nearest_other, other, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "curricularface", "adaface", "sphereface2"])
def test_a_head_whose_logits_are_no_map_of_its_cosines_asks_cosine(name):
    head = instantiate(name).train()
    x, y = make_batch(head)
    output = head(x, y, stats=True)
    assert not isinstance(output, HeadScores)
    step = MarginLoss(head).step(x, output, y, stats=True)
    target, other = target_and_nearest_other(head.cosine(x).float(), y)
    torch.testing.assert_close(step.stats.target, target, rtol=0, atol=1e-6)


def test_dynamic_adacos_rescales_its_logits_and_asks_cosine():
    head = instantiate("adacos", mode="dynamic").train()
    x, y = make_batch(head)
    twin = instantiate("adacos", mode="dynamic").train()
    twin.load_state_dict(head.state_dict())
    output = head(x, y, stats=True)
    assert not isinstance(output, HeadScores) and torch.equal(output, twin(x, y))
