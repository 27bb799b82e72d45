"""``trainer.compile=true`` compiles the model with its head (train.py ``training_views``): under torch.compile
(aot_eager: graph capture and AOTAutograd without code generation; 3-7 s of CPU a head, ElasticFace's seeded draws,
which break the graph, the most: not slow) the newer heads train as
eagerly, losses, gradients, the step statistics and the state they keep (AdaCos's scale, ElasticFace's and UniFace's
draws) alike, and their evaluation logits agree (ArcFace: tests/test_speed_equivalence.py; RBF: test_rbf.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from marginlab.heads.output import HeadLoss, HeadScores
from marginlab.losses import MarginLoss
from tests.heads.conftest import instantiate, make_batch

#: config -> overrides: the heads added with the head contract, each in the mode whose training forward differs
HEADS = {
    "elasticface": {},
    "elasticface+": {"plus": True},
    "adacos": {"mode": "dynamic"},
    "adacos-fixed": {"mode": "fixed"},
    "sphereface2": {},
    "spherefacer": {},
    "uniface": {"r": 0.5},  # a class sample per step, from (seed, step)
    "sface": {},
    "x2softmax": {},
}
STEPS = 2


def run(head, x, labels, compiled: bool):
    """STEPS training steps (the second one logs geometry) and one evaluation forward: (per step the loss, dx,
    dW and the step statistics; the evaluation logits; the head's state)."""
    forward = torch.compile(head, backend="aot_eager") if compiled else head
    criterion = MarginLoss(head)
    steps = []
    head.train()
    for step in range(STEPS):
        stats = step == STEPS - 1
        xx = x.clone().requires_grad_(True)
        output = forward(xx, labels, stats=stats)
        assert isinstance(output, (torch.Tensor, HeadLoss, HeadScores))
        result = criterion.step(xx, output, labels, stats=stats)
        dx, dw = torch.autograd.grad(result.loss, [xx, head.weight])
        steps.append((result.loss.detach(), dx, dw, *(result.stats or ())))
    head.eval()
    with torch.no_grad():
        evaluation = forward(x)
    return steps, evaluation, {k: v.clone() for k, v in head.state_dict().items()}


@pytest.mark.parametrize("name", HEADS)
def test_a_compiled_head_trains_and_evaluates_as_the_eager_one(name):
    torch.manual_seed(0)
    head = instantiate(name.split("-")[0].rstrip("+"), in_features=6, num_classes=7, **HEADS[name])
    x, labels = make_batch(head, batch=8, special=False)
    eager = run(copy.deepcopy(head), x, labels, compiled=False)
    torch._dynamo.reset()
    try:
        compiled = run(head, x, labels, compiled=True)
    finally:
        torch._dynamo.reset()
    for step, (got, want) in enumerate(zip(compiled[0], eager[0])):
        assert len(got) == len(want), f"step {step}: statistics in one run only"
        for what, a, b in zip(("loss", "dx", "dW", "target cos", "nearest cos"), got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, s=step, w=what: f"step {s} {w}: {m}")
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-4)
    assert compiled[2].keys() == eager[2].keys()
    for key, value in eager[2].items():
        torch.testing.assert_close(compiled[2][key], value, atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
