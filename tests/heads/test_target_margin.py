"""A head's target margin written once (heads/target_margin.py): AdaFace, MagFace and CurricularFace build their
unchunked logits and their chunked loss from one ``target_margin``; the two paths agree in float64 to rounding
(loss, dx, dW) and make each step's state update (running statistics, MagFace's g, CurricularFace's t) once."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from marginlab.heads.adaface import AdaFaceHead
from marginlab.heads.curricularface import CurricularFaceHead
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.target_margin import Margin, chunked

DIM, CLASSES = 6, 11

HEADS = {
    "adaface": partial(AdaFaceHead, s=64.0, m=0.4, h=0.333),
    "adaface_steep": partial(AdaFaceHead, s=32.0, m=1.2, h=2.0),  # both angle clamps act
    "magface": partial(MagFaceHead, l_a=1.0, u_a=9.0),  # norms on both sides of [l_a, u_a]
    "magface_fallback": partial(MagFaceHead, l_a=1.0, u_a=9.0, easy_margin=False),
    "curricularface": partial(CurricularFaceHead, s=64.0, m=0.5),
}
#: the method that makes each head's step state update (its running statistics, g, t), counted by ``step``
UPDATES = {AdaFaceHead: "margin_scaler", MagFaceHead: "magnitude", CurricularFaceHead: "update_t"}


def batch(head):
    """float64 features (norms 0 to ~40) and labels; rows with cos theta_y = +1 and -1, a zero feature, one at
    cos theta_j = +1 with another class."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, DIM, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 8.0, 10).unsqueeze(1).double()
    labels = torch.tensor([0, 3, 10, 5, 5, 7, 9, 1, 4, 2])
    w = head.weight.detach()
    x[0], x[1], x[2], x[3] = 2.5 * w[labels[0]], -1.7 * w[labels[1]], 0.0, 40.0 * w[8] / w[8].norm()
    return x, labels


def step(head, x, labels, chunked_path):
    """One training step's loss (CE plus MagFace's g) and its dx, dW, and how often the state update ran."""
    calls = []
    name = UPDATES[type(head)]
    original = getattr(head, name)
    setattr(head, name, lambda *args: calls.append(1) or original(*args))
    x = x.clone().requires_grad_(True)
    out = head.chunked_loss(x, labels).loss if chunked_path else F.cross_entropy(head(x, labels), labels)
    extra = head.extra_loss()
    total = out if extra is None else out + extra
    grads = torch.autograd.grad(total, [x, head.weight])
    delattr(head, name)
    return (total.detach(), *grads), len(calls)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_the_chunked_and_unchunked_paths_agree_and_update_the_state_once_a_step(name):
    torch.manual_seed(0)
    head = HEADS[name](DIM, CLASSES).double()
    x, labels = batch(head)
    plain, chunk = copy.deepcopy(head), copy.deepcopy(head)
    chunk.chunk_size = 4
    for _ in range(3):  # each step starts from the state the one before left
        expected, plain_calls = step(plain, x, labels, chunked_path=False)
        actual, chunk_calls = step(chunk, x, labels, chunked_path=True)
        assert plain_calls == chunk_calls == 1
        for what, a, e in zip(("loss", "dx", "dW"), actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=f"{name} {what}")
        for key, value in plain.state_dict().items():
            torch.testing.assert_close(chunk.state_dict()[key], value, rtol=1e-12, atol=0, msg=key)


def test_one_step_moves_each_running_statistic_by_one_update():
    torch.manual_seed(0)
    for chunked_path in (False, True):
        ada, curricular = AdaFaceHead(DIM, CLASSES, t_alpha=0.25).double(), CurricularFaceHead(DIM, CLASSES).double()
        x, labels = batch(ada)
        step(ada, x, labels, chunked_path)
        norms = x.norm(dim=1).clamp(0.001, 100.0)
        # AdaFace: mu <- a mu_batch + (1 - a) mu from 20, sigma from 100 (one update, not two)
        torch.testing.assert_close(ada.batch_mean, 0.75 * 20.0 + 0.25 * norms.mean().view(1), rtol=1e-12, atol=0)
        torch.testing.assert_close(ada.batch_std, 0.75 * 100.0 + 0.25 * norms.std().view(1), rtol=1e-12, atol=0)
        x, labels = batch(curricular)
        step(curricular, x, labels, chunked_path)
        cos_target = F.cosine_similarity(x, curricular.weight.detach()[labels], dim=1)
        cos_target[2] = 0.0  # (the zero feature)
        # CurricularFace: t <- 0.01 mean(cos theta_y) + 0.99 t from 0
        torch.testing.assert_close(curricular.t, 0.01 * cos_target.mean().view(1), rtol=1e-12, atol=1e-15)


def test_chunked_slopes_are_the_definition_s_autograd_slopes_and_phi_keeps_its_other_history():
    m = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64, requires_grad=True)
    boundary = torch.tensor(0.1, dtype=torch.float64)

    def margin(t):  # a per-sample angular margin from a tensor with a gradient of its own, a clamp on the others
        return Margin(torch.cos(torch.acos(t.clamp(-0.99, 0.99)) + m), lambda c: torch.where(c > boundary, c * c, c))

    t = torch.tensor([0.5, 0.995, -0.2], dtype=torch.float64)
    result = chunked(margin)(t)
    leaf = t.clone().requires_grad_(True)
    expected = torch.autograd.grad(margin(leaf).target.sum(), leaf)[0]
    assert torch.equal(result.value.detach(), margin(t).target.detach()) and torch.equal(result.slope, expected)
    assert result.slope[1] == 0.0  # the clamp acts
    cos = torch.tensor([[0.05, 0.75], [-1.0, 1.0]], dtype=torch.float64)
    value, slope = result.others(cos, True)
    assert torch.equal(result.others(cos, False)[0], value) and result.others(cos, False)[1] is None
    assert torch.equal(value, torch.tensor([[0.05, 0.5625], [-1.0, 1.0]], dtype=torch.float64))
    assert torch.equal(slope, torch.tensor([[1.0, 1.5], [1.0, 2.0]], dtype=torch.float64))
    (grad_m,) = torch.autograd.grad(result.value.sum(), m)  # what the chunked loss's backward takes on to m
    torch.testing.assert_close(grad_m, -torch.sin(torch.acos(t.clamp(-0.99, 0.99)) + m.detach()), rtol=1e-15, atol=0)
