"""The one-Function training forward of the cosine-margin heads (fused_margin.py): the path it takes,
its slopes against autograd, tiny features, in-place edits of its logits, and its memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import marginlab.heads.kernels.fast_cosine as fast
from marginlab.heads.base import cos_plus_angle, cos_plus_angle_and_slope

FUSED_HEADS = [
    ("normface", {}),
    ("amsoftmax", {}),
    ("arcface", {}),
    ("arcface", {"easy_margin": True}),
    ("arcface", {"mode": "straight_through"}),
    ("combined", {}),
    ("combined", {"m1": 1.35, "m2": 0.0, "m3": 0.0}),
    ("combined", {"m1": 1.0, "m2": 0.0}),
]


def plain_logits(head, x, labels):
    """The same head written with autograd ops: normalize, linear, the margin by acos/cos, scatter.
    A feature of norm below F.normalize's eps (1e-12) counts as zero: unit vector 0, no gradient."""
    unit = F.normalize(x) * (torch.linalg.vector_norm(x, dim=1, keepdim=True) >= 1e-12)
    cos = F.linear(unit, F.normalize(head.weight)).clamp(-1.0, 1.0)
    t = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    return (cos * head.s).scatter(1, labels.view(-1, 1), (head.s * head.target_cosine(t, labels)).view(-1, 1))


def assert_fused_matches_plain(head, x, labels, loss, edit=lambda logits: logits, atol=1e-10, rtol=1e-9):
    """Logits and the gradients to x and W of the fused head against ``plain_logits``, each passed
    through ``edit`` and then ``loss``."""
    results = []
    for forward in (head, lambda xx, yy: plain_logits(head, xx, yy)):
        xx = x.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        out = edit(forward(xx, labels))
        loss(out).backward()
        results.append((out.detach(), xx.grad, head.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("name, kwargs", FUSED_HEADS)
def test_training_forward_is_one_autograd_node(name, kwargs, hh):
    head = hh.instantiate(name, in_features=4, num_classes=7, **kwargs).train()
    x = torch.randn(5, 4, requires_grad=True)
    logits = head(x, torch.tensor([0, 1, 2, 3, 6]))
    assert type(logits.grad_fn).__name__ == "_FusedCosineMarginBackward"
    leaves = {type(fn).__name__ for fn, _ in logits.grad_fn.next_functions if fn is not None}
    assert leaves == {"AccumulateGrad"}  # x and W directly: no normalize/scatter nodes in between


def test_learnable_scale_takes_the_autograd_path(hh):
    head = hh.instantiate("normface", in_features=4, num_classes=7, learnable_scale=True)
    logits = head(torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 6]))
    assert type(logits.grad_fn).__name__ != "_FusedCosineMarginBackward"


@pytest.mark.parametrize("name, kwargs", FUSED_HEADS)
@pytest.mark.parametrize("batch, dim", [(3, 9), (9, 3)], ids=["S-from-logits", "S-from-weights"])
@pytest.mark.parametrize("block", [None, 12], ids=["one-block", "blocks"])
def test_values_and_gradients_match_autograd(name, kwargs, batch, dim, block, hh, monkeypatch):
    """Both ways of computing the weight-norm term (D > B: from the logits, with the target entries
    fixed up; D <= B: from W and dW), in one block of classes and in several (float64)."""
    if block is not None:
        monkeypatch.setattr(fast, "BLOCK_ELEMENTS", block)  # 4 or 1 classes a block
    head = hh.instantiate(name, in_features=dim, num_classes=7, **kwargs).double().train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (batch,), generator=g)
    assert_fused_matches_plain(head, x, labels, lambda out: F.cross_entropy(out, labels))


@pytest.mark.parametrize("name, kwargs", FUSED_HEADS)
def test_slope_is_the_derivative_of_the_value(name, kwargs, hh):
    """margin_and_slope's slope against autograd of an independent acos/cos form of each margin."""
    head = hh.instantiate(name, in_features=4, num_classes=7, **kwargs).double()
    t = torch.cat(
        [
            torch.linspace(-0.999, 0.999, 41, dtype=torch.float64),
            torch.tensor([math.cos(math.pi - 0.5) + 1e-3, math.cos(math.pi - 0.5) - 1e-3], dtype=torch.float64),
        ]
    )
    tt = t.clone().requires_grad_(True)
    theta = torch.acos(tt)
    if name == "normface":
        expected = tt
    elif name == "amsoftmax":
        expected = tt - head.m
    elif name == "arcface" and head.mode == "straight_through":
        expected = tt + (torch.cos(theta + head.m) - tt).detach()
    elif name == "arcface":
        phi = torch.cos(theta + head.m)
        expected = (
            torch.where(tt > 0, phi, tt)
            if head.easy_margin
            else torch.where(theta + head.m < math.pi, phi, tt - head.m * math.sin(head.m))
        )
    else:
        expected = torch.cos(head.m1 * theta + head.m2) - head.m3
    (slope_ref,) = torch.autograd.grad(expected.sum(), tt)
    value, slope = head.margin_and_slope(t)
    torch.testing.assert_close(value, expected.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        torch.as_tensor(slope, dtype=torch.float64).expand_as(t), slope_ref, atol=1e-9, rtol=1e-9
    )


def test_cos_plus_angle_slope_at_and_near_plus_minus_one():
    cos = torch.tensor([-1.0, -1 + 1e-14, -0.3, 0.0, 0.7, 1 - 1e-14, 1.0], dtype=torch.float64)
    c = cos.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(cos_plus_angle(c, math.cos(0.5), math.sin(0.5)).sum(), c)
    value, slope = cos_plus_angle_and_slope(cos, math.cos(0.5), math.sin(0.5))
    torch.testing.assert_close(value, cos_plus_angle(cos, math.cos(0.5), math.sin(0.5)), atol=0, rtol=0)
    torch.testing.assert_close(slope, ref, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(slope).all()


def test_combined_slope_within_eps_of_plus_minus_one(hh):
    """The combined margin's slope is that of acos(cos clamped to [-1 + eps, 1 - eps]): 0 within eps
    of +-1 (where d acos / d cos = -inf), the plain derivative inside."""
    head = hh.instantiate("combined", in_features=4, num_classes=7, m1=1.2, m2=0.3, m3=0.1).double()
    t = torch.tensor([-1.0, -1 + 1e-8, -0.4, 0.5, 1 - 1e-8, 1.0], dtype=torch.float64)
    tt = t.clone().requires_grad_(True)
    theta = torch.acos(tt.clamp(-1 + 1e-7, 1 - 1e-7))
    (expected,) = torch.autograd.grad((torch.cos(1.2 * theta + 0.3) - 0.1).sum(), tt)
    _, slope = head.margin_and_slope(t)
    torch.testing.assert_close(slope, expected, atol=1e-12, rtol=1e-9)
    assert (slope[[0, 1, 4, 5]] == 0).all() and (slope[[2, 3]] != 0).all()


@pytest.mark.parametrize("name, kwargs", [("amsoftmax", {}), ("arcface", {})])
def test_tiny_and_zero_features_match_normalize(name, kwargs, hh):
    """Below F.normalize's eps (1e-12) a feature counts as zero: cosines 0 and no gradient (F.normalize
    would divide by eps and pass back ~1e12 times the gradient)."""
    head = hh.instantiate(name, in_features=4, num_classes=7, **kwargs).double().train()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, generator=g, dtype=torch.float64)
    x[1] *= 3e-13 / x[1].norm()  # below eps
    x[2] = 0.0
    labels = torch.tensor([0, 3, 5, 6])
    upstream = torch.randn(4, 7, generator=g, dtype=torch.float64)
    assert_fused_matches_plain(head, x, labels, lambda out: (out * upstream).sum(), atol=1e-9)


@pytest.mark.parametrize("name", ["amsoftmax", "arcface"])
def test_in_place_edit_of_the_logits_after_the_forward(name, hh):
    """An edit the Function did not make (here x2 in place) switches its backward to the formula that
    does not read the logits; the gradients stay exact. D > B, where the logits would be read."""
    head = hh.instantiate(name, in_features=9, num_classes=7).double().train()
    x, labels = hh.make_batch(head, batch=6, special=False)
    assert_fused_matches_plain(
        head, x.double(), labels, lambda out: F.cross_entropy(out, labels), edit=lambda logits: logits.mul_(2.0)
    )


def test_bfloat16_features_under_autocast_get_bfloat16_gradients(hh):
    head = hh.instantiate("arcface", in_features=4, num_classes=7).train()
    x = torch.randn(6, 4).bfloat16().requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, labels)
    assert logits.dtype == torch.float32
    F.cross_entropy(logits, labels).backward()
    assert x.grad.dtype == torch.bfloat16 and head.weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(head.weight.grad).all()
