"""Under bf16 autocast the heads that edit the cosines with ordinary ops (sub-center ArcFace, CurricularFace,
MagFace, AdaFace) take the target cosine in float64 from the B target rows, as ArcFace's fused path does
(``MarginHead.cosine_and_target``): their target logit matches the same head run in float64 to float32
rounding, where the bf16 product is off by up to ~1e-2 in cos (logits at s = 64 near theta = 0)."""

from __future__ import annotations

import copy

import pytest
import torch

HEADS = ["subcenter_arcface", "curricularface", "magface", "adaface", "arcface"]
#: small target angles (rad), where acos's slope makes cosine errors expensive
ANGLES = [0.0, 1e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0]


def batch_at_angles(head, norm: float, hh):
    rows = head.weight.detach()
    k = rows.shape[0] // head.num_classes  # sub-centres: the first of each class
    labels = torch.arange(len(ANGLES)) % head.num_classes
    x = torch.stack(
        [
            hh.feature_at_angle(rows[int(y) * k], theta, norm, seed=i)
            for i, (y, theta) in enumerate(zip(labels.tolist(), ANGLES))
        ]
    )
    return x, labels


@pytest.mark.parametrize("name", HEADS)
def test_bf16_target_logit_matches_float64(hh, name):
    head = hh.instantiate(name, in_features=256, num_classes=6)
    x, labels = batch_at_angles(head, 30.0, hh)  # MagFace: a norm inside [l_a, u_a]
    reference = copy.deepcopy(head).double().eval()  # eval: EMA buffers stay put; labels still give the margin
    expected = reference(x.double(), labels).gather(1, labels.view(-1, 1)).squeeze(1)
    head.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x, labels).gather(1, labels.view(-1, 1)).squeeze(1)
    assert got.dtype == torch.float32
    # the margin runs in float32: cos theta_y rounded to float32 (6e-8 near 1) moves theta by up to
    # ~6e-5 at theta = 1e-3, ~2e-3 logits at s = 64 (the bf16 product alone: up to ~1 logit)
    torch.testing.assert_close(got.double(), expected, atol=3e-3, rtol=0)


def test_bf16_product_alone_would_miss_the_bound(hh):
    """The check above is not vacuous: the bf16 product's own target cosines are off by much more."""
    head = hh.instantiate("curricularface", in_features=256, num_classes=6).eval()
    x, labels = batch_at_angles(head, 30.0, hh)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product = head.normalized_cosine(x).gather(1, labels.view(-1, 1)).squeeze(1)
    exact = torch.cos(torch.tensor(ANGLES, dtype=torch.float64))
    assert (product.double() - exact).abs().max() * head.s > 5e-2


def test_subcenter_target_is_the_best_sub_centre_and_gets_the_gradient(hh):
    head = hh.instantiate("subcenter_arcface", in_features=16, num_classes=4, k=3).double().train()
    labels = torch.tensor([0, 1, 2, 3])
    # each sample lies near its class's second sub-centre (row y*3 + 1)
    x = torch.stack([hh.feature_at_angle(head.weight[3 * y + 1], 0.2, 2.0, seed=y).double() for y in range(4)])
    x.requires_grad_(True)
    head(x, labels)[torch.arange(4), labels].sum().backward()
    grad_rows = head.weight.grad.norm(dim=1).view(4, 3)
    assert (grad_rows[:, 1] > 0).all()
