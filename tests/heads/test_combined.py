"""Combined margin head: s (cos(m1 theta + m2) - m3), reductions, stability, cost and config."""

from __future__ import annotations

import math

import pytest
import torch

from marginlab.errors import ConfigError
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.combined import CombinedMarginHead
from marginlab.heads.lsoftmax import psi
from marginlab.heads.normface import NormFaceHead


def combined_reference(x, weight, labels, s, m1, m2, m3):
    """float64, one sample at a time with math.acos / math.cos."""
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(weight.double(), dim=1).T
    out = s * cos.clamp(-1, 1)
    for i, y in enumerate(labels.tolist()):
        c = max(-1.0, min(1.0, cos[i, y].item()))
        out[i, y] = s * (math.cos(m1 * math.acos(c) + m2) - m3)
    return out


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (1.5, 0.2, 0.1), (1.0, 0.5, 0.0)])
def test_training_logits_match_reference(hh, m1, m2, m3):
    head = CombinedMarginHead(8, 10, s=32.0, m1=m1, m2=m2, m3=m3)
    x, labels = hh.make_batch(head, batch=16)
    logits = head.train()(x, labels)
    expected = combined_reference(x, head.weight.detach(), labels, 32.0, m1, m2, m3)
    torch.testing.assert_close(logits.double(), expected, atol=1e-4, rtol=1e-5)


def test_reductions(hh):
    base = CombinedMarginHead(8, 10, s=20.0, m1=1.0, m2=0.0, m3=0.0)
    x, labels = hh.make_batch(base, batch=16)
    norm = hh.copy_weights(base, NormFaceHead(8, 10, s=20.0))
    torch.testing.assert_close(base(x, labels), norm(x, labels))
    cosface = hh.copy_weights(base, AMSoftmaxHead(8, 10, s=20.0, m=0.35))
    m3_only = hh.copy_weights(base, CombinedMarginHead(8, 10, s=20.0, m1=1.0, m2=0.0, m3=0.35))
    torch.testing.assert_close(m3_only(x, labels), cosface(x, labels))
    # m2 alone: InsightFace's cos(theta + m2) without fallback == arcface straight_through forward,
    # and == arcface exact wherever theta + m2 < pi
    arc = hh.copy_weights(base, CombinedMarginHead(8, 10, s=20.0, m1=1.0, m2=0.5, m3=0.0))
    st = hh.copy_weights(base, ArcFaceHead(8, 10, s=20.0, m=0.5, mode="straight_through"))
    exact = hh.copy_weights(base, ArcFaceHead(8, 10, s=20.0, m=0.5))
    torch.testing.assert_close(arc(x, labels)[2:], st(x, labels)[2:], atol=1e-4, rtol=1e-5)
    cos_y = exact.normalized_cosine(x).gather(1, labels.view(-1, 1)).squeeze(1)
    ok = cos_y > math.cos(math.pi - 0.5)
    torch.testing.assert_close(arc(x, labels)[ok], exact(x, labels)[ok], atol=1e-4, rtol=1e-5)


def test_m1_alone_is_sphereface_psi_on_the_first_segment(hh):
    head = CombinedMarginHead(8, 10, s=10.0, m1=2.0, m2=0.0, m3=0.0)
    labels = torch.arange(6)
    thetas = [0.1, 0.4, 0.8, 1.2, 1.5, math.pi / 2 - 1e-3]  # m1 theta within [0, pi]: psi_2 = cos(2 theta)
    x = torch.stack([hh.feature_at_angle(head.weight[y], t, 1.0, seed=y) for y, t in zip(labels.tolist(), thetas)])
    target = head(x, labels).gather(1, labels.view(-1, 1)).squeeze(1).double()
    expected = 10.0 * psi(torch.cos(torch.tensor(thetas, dtype=torch.float64)), 2)
    torch.testing.assert_close(target, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.3, 0.2), (1.35, 0.0, 0.0), (1.0, 0.0, 0.35)])
def test_gradcheck(hh, m1, m2, m3):
    head = CombinedMarginHead(5, 6, s=4.0, m1=m1, m2=m2, m3=m3)
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("m1, m2, m3", [(1.0, 0.3, 0.2), (1.5, 0.0, 0.0), (1.0, 0.0, 0.35)])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, m1, m2, m3, input_dtype):
    head = CombinedMarginHead(8, 10, m1=m1, m2=m2, m3=m3)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_gradient_finite_at_cos_plus_minus_one(hh):
    head = CombinedMarginHead(8, 10, m1=1.35, m2=0.3, m3=0.0)
    labels = torch.tensor([0, 1])
    x = torch.stack([head.weight.detach()[0] * 3.0, -head.weight.detach()[1]]).double().requires_grad_(True)
    head.double()(x, labels).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_acos_only_on_the_target_column(hh):
    head = CombinedMarginHead(8, 10)
    x, labels = hh.make_batch(head, batch=16)
    sizes = hh.acos_sizes(head, x, labels)
    assert sizes and max(sizes) <= x.shape[0]


def test_margin_violation():
    head = CombinedMarginHead(4, 3, m1=1.0, m2=0.3, m3=0.0)
    theta_y, theta_o = torch.tensor([0.2, 0.2]), torch.tensor([0.6, 0.4])
    assert head.probe_margin.violation(torch.cos(theta_y), torch.cos(theta_o)).tolist() == [False, True]


def test_probe_cosine(hh):
    head = CombinedMarginHead(8, 10)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"m1": 0.5}, "m1=0.5"),
        ({"m2": -0.1}, "m2=-0.1"),
        ({"m2": 4.0}, "m2=4.0"),
        ({"m3": -0.2}, "m3=-0.2"),
    ],
)
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ConfigError, match="must lie in") as err:
        CombinedMarginHead(8, 10, **kwargs)
    assert name in str(err.value)
