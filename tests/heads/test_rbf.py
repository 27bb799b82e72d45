"""RBF-Softmax head: s exp(-||x - W_j||^2 / gamma), the same in training and evaluation."""

from __future__ import annotations

import pytest
import torch

from marginlab.errors import ConfigError
from marginlab.heads.rbf import RBFHead


def rbf_reference(x, weight, s, gamma):
    """float64 from explicit differences (B x C x D is fine at test sizes)."""
    diff = x.double().unsqueeze(1) - weight.double().unsqueeze(0)
    return s * torch.exp(-(diff * diff).sum(-1) / gamma)


@pytest.mark.parametrize("s, gamma", [(35.0, 16.0), (10.0, 2.0)])
def test_logits_match_reference(hh, s, gamma):
    head = RBFHead(8, 10, s=s, gamma=gamma)
    x, labels = hh.make_batch(head, batch=16, scale=0.7)
    with torch.no_grad():
        x[3] = head.weight[labels[3]]  # on the prototype: d = 0, logit s
    expected = rbf_reference(x, head.weight.detach(), s, gamma)
    train = head.train()(x, labels)
    torch.testing.assert_close(train.double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(head.eval()(x), train)
    assert train[3, labels[3]].item() == pytest.approx(s, rel=1e-5)


def test_distance_precision_under_autocast(hh):
    """Close to a large prototype the distance must not drown in bfloat16 cancellation."""
    head = RBFHead(16, 4, s=35.0, gamma=16.0)
    with torch.no_grad():
        head.weight.mul_(40.0)  # ||W_j|| ~ 10 or more
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 2, 3])
    x = head.weight.detach()[labels] + 0.5 * torch.randn(4, 16, generator=g) / 4  # distance ~ 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head(x, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), rbf_reference(x, head.weight.detach(), 35.0, 16.0),
                               atol=1e-2, rtol=1e-3)


def test_gradcheck(hh):
    head = RBFHead(5, 6, s=3.0, gamma=2.0)
    x, labels = hh.make_batch(head, batch=6, special=False, scale=0.5)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, input_dtype):
    head = RBFHead(8, 10)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_probe_cosine(hh):
    head = RBFHead(8, 10)
    x, labels = hh.make_batch(head, scale=1.0)
    hh.check_probe_cosine(head, x, labels)


@pytest.mark.parametrize("kwargs, pattern", [({"gamma": 0.0}, r"gamma=0.0 .*\(0, inf\]"),
                                             ({"gamma": -16.0}, r"gamma=-16.0"),
                                             ({"s": 0.0}, r"s=0.0 .*\(0, inf\]")])
def test_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RBFHead(8, 10, **kwargs)


def test_config(hh):
    head = hh.instantiate("rbf")
    assert isinstance(head, RBFHead) and (head.s, head.gamma) == (35.0, 16.0)
