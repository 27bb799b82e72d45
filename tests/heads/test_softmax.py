"""Plain softmax head: W x + b."""

from __future__ import annotations

import pytest
import torch

from marginlab.heads.softmax import SoftmaxHead


@pytest.mark.parametrize("bias", [True, False])
def test_logits_match_reference(hh, bias):
    head = SoftmaxHead(8, 10, bias=bias)
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.linspace(-1, 1, 10))
    x, labels = hh.make_batch(head, batch=16)
    w, b = head.weight.detach().double(), (head.bias.detach().double() if bias else torch.zeros(10).double())
    expected = torch.stack([torch.stack([xi.double() @ wj + bj for wj, bj in zip(w, b)]) for xi in x])
    torch.testing.assert_close(head.train()(x, labels).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.eval()(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(hh, bias):
    head = SoftmaxHead(5, 6, bias=bias)
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, input_dtype):
    head = SoftmaxHead(8, 10)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype, expect_float32=False)


def test_bf16_autocast_logits_are_float32(hh):
    head = SoftmaxHead(8, 10)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels)


def test_probe_cosine(hh):
    head = SoftmaxHead(8, 10)
    with torch.no_grad():
        head.bias.fill_(0.3)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


def test_config(hh):
    head = hh.instantiate("softmax")
    assert isinstance(head, SoftmaxHead) and head.bias is not None
    assert hh.instantiate("softmax", bias=False).bias is None
