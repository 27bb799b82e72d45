"""ArcFace head: exact (threshold/fallback, easy_margin) and straight_through modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.normface import NormFaceHead


def arcface_reference(x, weight, labels, s, m, mode="exact", easy_margin=False):
    """float64 per sample with the angle itself: theta = acos(cos)."""
    cos = (F.normalize(x.double(), dim=1) @ F.normalize(weight.double(), dim=1).T).clamp(-1, 1)
    out = s * cos
    for i, y in enumerate(labels.tolist()):
        c = cos[i, y].item()
        theta = math.acos(c)
        if mode == "straight_through":  # InsightFace arcface_torch: no threshold
            t = math.cos(theta + m)
        elif easy_margin:  # margin only where theta < pi / 2
            t = math.cos(theta + m) if theta < math.pi / 2 else c
        else:  # fallback once theta + m passes pi
            t = math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
        out[i, y] = s * t
    return out


def spread_batch(head, hh, batch=24):
    """Targets at angles spread over [0, pi] (both sides of the pi - m threshold and of pi/2)."""
    labels = torch.arange(batch) % head.num_classes
    thetas = torch.linspace(0.0, math.pi, batch).tolist()
    x = torch.stack(
        [hh.feature_at_angle(head.weight[y], t, 3.0, seed=i) for i, (y, t) in enumerate(zip(labels.tolist(), thetas))]
    )
    return x, labels


@pytest.mark.parametrize("mode, easy", [("exact", False), ("exact", True), ("straight_through", False)])
def test_training_logits_match_reference(hh, mode, easy):
    head = ArcFaceHead(8, 10, s=16.0, m=0.5, easy_margin=easy, mode=mode)
    x1, l1 = hh.make_batch(head, batch=12)
    x2, l2 = spread_batch(head, hh)
    x, labels = torch.cat([x1, x2]), torch.cat([l1, l2])
    expected = arcface_reference(x, head.weight.detach(), labels, 16.0, 0.5, mode, easy)
    got = head.train()(x, labels).double()
    torch.testing.assert_close(got[2:], expected[2:], atol=2e-4, rtol=1e-5)
    # rows 0/1 sit at cos = +-1 where float32 rounding of cos moves acos by up to ~3.5e-4 rad
    torch.testing.assert_close(got[:2], expected[:2], atol=1e-2, rtol=0)


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
def test_m0_equals_normface(hh, mode):
    head = ArcFaceHead(8, 10, s=30.0, m=0.0, mode=mode)
    ref = hh.copy_weights(head, NormFaceHead(8, 10, s=30.0))
    x, labels = hh.make_batch(head, batch=16)
    torch.testing.assert_close(head(x, labels)[2:], ref(x, labels)[2:], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(head(x), ref(x))


def test_straight_through_has_no_fallback_and_normface_gradient(hh):
    head = ArcFaceHead(8, 10, s=16.0, m=0.5, mode="straight_through")
    exact = hh.copy_weights(head, ArcFaceHead(8, 10, s=16.0, m=0.5))
    norm = hh.copy_weights(head, NormFaceHead(8, 10, s=16.0))
    x, labels = spread_batch(head, hh)
    x = x[1:-1]  # away from cos = +-1
    labels = labels[1:-1]
    cos_y = norm.normalized_cosine(x).gather(1, labels.view(-1, 1)).squeeze(1)
    theta = torch.acos(cos_y)
    st_target = head(x, labels).gather(1, labels.view(-1, 1)).squeeze(1)
    torch.testing.assert_close(st_target, 16.0 * torch.cos(theta + 0.5), atol=1e-4, rtol=1e-5)
    beyond = theta + 0.5 > math.pi
    assert beyond.any()
    ex_target = exact(x, labels).gather(1, labels.view(-1, 1)).squeeze(1)
    assert (ex_target[beyond] < st_target[beyond] - 1e-3).all()  # exact keeps decreasing, ST turns up
    # gradient: exactly NormFace's (d logit / d cos = s for every column)
    upstream = torch.randn(x.shape[0], 10, generator=torch.Generator().manual_seed(1))
    grads = []
    for h in (head, norm):
        xx = x.clone().requires_grad_(True)
        h.zero_grad()
        (h(xx, labels) * upstream).sum().backward()
        grads.append((xx.grad, h.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("easy", [False, True])
def test_gradcheck_exact(hh, easy):
    head = ArcFaceHead(5, 6, s=4.0, m=0.5, easy_margin=easy)
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("mode, easy", [("exact", False), ("exact", True), ("straight_through", False)])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, mode, easy, input_dtype):
    head = ArcFaceHead(8, 10, mode=mode, easy_margin=easy)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_straight_through_takes_acos_of_target_column_only(hh):
    head = ArcFaceHead(8, 10, mode="straight_through")
    x, labels = hh.make_batch(head, batch=16)
    sizes = hh.acos_sizes(head, x, labels)
    assert sizes and max(sizes) <= x.shape[0]


def test_probe_cosine(hh):
    head = ArcFaceHead(8, 10)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


def test_bad_hyperparameters():
    with pytest.raises(ConfigError, match=r"mode='fast'.*exact, straight_through"):
        ArcFaceHead(8, 10, mode="fast")
    with pytest.raises(ConfigError, match="easy_margin"):
        ArcFaceHead(8, 10, mode="straight_through", easy_margin=True)
    with pytest.raises(ConfigError, match=r"m=2.0 .*\[0, 1.5708\]"):
        ArcFaceHead(8, 10, m=2.0)


def test_config_defaults(hh):
    head = hh.instantiate("arcface")
    assert isinstance(head, ArcFaceHead)
    assert (head.s, head.m, head.easy_margin, head.mode) == (64.0, 0.5, False, "exact")
    assert hh.instantiate("arcface", mode="straight_through").mode == "straight_through"
