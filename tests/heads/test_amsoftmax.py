"""AM-Softmax / CosFace head: target s (cos theta_y - m)."""

from __future__ import annotations

import pytest
import torch

from marginlab.errors import ConfigError
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.normface import NormFaceHead


def test_training_logits_match_reference(hh):
    head = AMSoftmaxHead(8, 10, s=30.0, m=0.35)
    x, labels = hh.make_batch(head, batch=16)
    cos = hh.reference_cosine(x, head.weight.detach())
    expected = 30.0 * cos
    for i, y in enumerate(labels.tolist()):  # AM-Softmax: only the target column moves
        expected[i, y] = 30.0 * (cos[i, y] - 0.35)
    torch.testing.assert_close(head.train()(x, labels).double(), expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(head.eval()(x).double(), 30.0 * cos, atol=1e-4, rtol=1e-5)


def test_m0_equals_normface(hh):
    head = AMSoftmaxHead(8, 10, s=20.0, m=0.0)
    ref = hh.copy_weights(head, NormFaceHead(8, 10, s=20.0))
    x, labels = hh.make_batch(head)
    torch.testing.assert_close(head(x, labels), ref(x, labels))


def test_gradcheck(hh):
    head = AMSoftmaxHead(5, 6, s=4.0, m=0.35)
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, input_dtype):
    head = AMSoftmaxHead(8, 10)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_probe_cosine_and_margin(hh):
    head = AMSoftmaxHead(8, 10, m=0.35)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)
    assert head.probe_margin.violation(torch.tensor([0.9, 0.9]), torch.tensor([0.5, 0.6])).tolist() == [False, True]


@pytest.mark.parametrize("kwargs, pattern", [({"m": -0.1}, r"m=-0.1 .*\[0, 2\]"), ({"m": 2.5}, r"m=2.5")])
def test_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        AMSoftmaxHead(8, 10, **kwargs)
