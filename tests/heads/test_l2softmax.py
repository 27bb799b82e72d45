"""L2-constrained softmax head: alpha x/||x|| into a linear classifier, alpha='auto' bound."""

from __future__ import annotations

import math

import pytest
import torch

from marginlab.errors import ConfigError
from marginlab.heads.l2softmax import L2SoftmaxHead
from marginlab.heads.softmax import SoftmaxHead


def l2softmax_reference(x, weight, bias, alpha):
    """float64, per sample: alpha * W x / ||x|| + b (a zero feature stays zero)."""
    rows = []
    for xi in x.double():
        n = xi.norm()
        f = alpha * xi / n if n > 0 else xi
        rows.append(weight.double() @ f + (0.0 if bias is None else bias.double()))
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
def test_logits_match_reference(hh, bias):
    head = L2SoftmaxHead(8, 10, alpha=7.5, bias=bias)
    if bias:
        with torch.no_grad():
            head.bias.copy_(torch.linspace(-0.5, 0.5, 10))
    x, labels = hh.make_batch(head, batch=16)
    expected = l2softmax_reference(x, head.weight.detach(), head.bias.detach() if bias else None, 7.5)
    torch.testing.assert_close(head.train()(x, labels).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.eval()(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_is_softmax_on_scaled_unit_features(hh):
    head = L2SoftmaxHead(8, 10, alpha=5.0)
    ref = hh.copy_weights(head, SoftmaxHead(8, 10))
    x, labels = hh.make_batch(head, special=False)
    torch.testing.assert_close(head(x, labels), ref(5.0 * x / x.norm(dim=1, keepdim=True), labels))


def test_auto_alpha_is_the_lower_bound():
    assert L2SoftmaxHead(8, 10).alpha == pytest.approx(math.log(0.9 * 8 / 0.1))
    assert L2SoftmaxHead(8, 1000, p=0.99).alpha == pytest.approx(math.log(0.99 * 998 / 0.01))


def test_gradcheck(hh):
    head = L2SoftmaxHead(5, 6, alpha=3.0)
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, input_dtype):
    head = L2SoftmaxHead(8, 10)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_probe_cosine(hh):
    head = L2SoftmaxHead(8, 10, alpha=4.0)
    with torch.no_grad():
        head.bias.fill_(-0.7)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


@pytest.mark.parametrize(
    "kwargs, num_classes, pattern",
    [
        ({"alpha": "auto"}, 2, r"num_classes > 2"),
        ({"alpha": "big"}, 10, r"alpha='big' .*number > 0 or 'auto'"),
        ({"alpha": 0.0}, 10, r"alpha=0.0 .*\(0, inf\]"),
        ({"alpha": -3.0}, 10, r"alpha=-3.0"),
        ({"p": 1.0}, 10, r"p=1.0 .*\(0, 1\)"),
        ({"p": 0.1}, 3, r"alpha='auto' gives .* <= 0"),
    ],
)
def test_bad_hyperparameters(kwargs, num_classes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        L2SoftmaxHead(8, num_classes, **kwargs)


def test_fixed_alpha_with_two_classes_is_fine():
    assert L2SoftmaxHead(8, 2, alpha=10.0).alpha == 10.0


def test_config(hh):
    head = hh.instantiate("l2softmax")
    assert isinstance(head, L2SoftmaxHead) and head.bias is not None
    assert head.alpha == pytest.approx(math.log(0.9 * 8 / 0.1))
    assert hh.instantiate("l2softmax", alpha=16.0).alpha == 16.0
