"""NormFace head (also Cosine Normalization's cosine head and COCO): s cos(theta_j), learnable s."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marginlab.errors import ConfigError
from marginlab.heads.normface import NormFaceHead


@pytest.mark.parametrize("learnable", [False, True])
def test_logits_match_reference(hh, learnable):
    head = NormFaceHead(8, 10, s=12.0, learnable_scale=learnable)
    x, labels = hh.make_batch(head, batch=16)
    expected = 12.0 * hh.reference_cosine(x, head.weight.detach())
    torch.testing.assert_close(head.train()(x, labels).double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.eval()(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_learnable_scale_is_a_trained_parameter(hh):
    head = NormFaceHead(8, 10, s=10.0, learnable_scale=True)
    assert isinstance(head.s, nn.Parameter) and head.s.item() == 10.0
    assert "s" in dict(head.named_parameters()) and "s" in head.state_dict()
    x, labels = hh.make_batch(head)
    torch.nn.functional.cross_entropy(head(x, labels), labels).backward()
    assert head.s.grad is not None and head.s.grad.item() != 0.0
    with torch.no_grad():
        head.s.fill_(13.5)
    assert head.schedule_values() == {"s": 13.5}
    assert NormFaceHead(8, 10, s=10.0).schedule_values() == {}


@pytest.mark.parametrize("learnable", [False, True])
def test_gradcheck(hh, learnable):
    head = NormFaceHead(5, 6, s=3.0, learnable_scale=learnable)
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, learnable, input_dtype):
    head = NormFaceHead(8, 10, learnable_scale=learnable)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)
    if learnable:
        assert torch.isfinite(head.s.grad).all()


def test_probe_cosine(hh):
    head = NormFaceHead(8, 10)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


@pytest.mark.parametrize("s", [-1.0, float("inf")])  # s=0: test_head_contract.py
def test_bad_scale(s):
    with pytest.raises(ConfigError, match="s="):
        NormFaceHead(8, 10, s=s)


def test_configs(hh):
    head = hh.instantiate("normface")
    assert isinstance(head, NormFaceHead) and head.s == 16.0 and not head.learnable_scale
    assert isinstance(hh.instantiate("normface", learnable_scale=True).s, nn.Parameter)
    cosine = hh.instantiate("cosine")  # Cosine Normalization: plain cosines
    assert isinstance(cosine, NormFaceHead) and cosine.s == 1.0
    x, labels = hh.make_batch(cosine)
    torch.testing.assert_close(cosine(x).double(), hh.reference_cosine(x, cosine.weight.detach()), atol=1e-6, rtol=1e-6)
    coco = hh.instantiate("coco")  # COCO: the same formula with its own alpha
    assert isinstance(coco, NormFaceHead) and coco.s == pytest.approx(21.475)


def test_learnt_scale_is_clamped_at_0_01(hh):
    """NormFace prototxt/scaled_cosine_softmax.prototxt, cosine_scale: min_value 0.01."""
    head = NormFaceHead(8, 10, s=10.0, learnable_scale=True).train()
    x, labels = hh.make_batch(head, special=False)
    with torch.no_grad():
        head.s.fill_(-3.0)  # e.g. after a large step
    logits = head(x, labels)
    assert head.s.item() == pytest.approx(0.01)
    torch.testing.assert_close(
        logits, 0.01 * hh.reference_cosine(x, head.weight.detach()).float(), atol=1e-6, rtol=1e-5
    )
    with torch.no_grad():
        head.s.fill_(0.5)  # above the bound: untouched
    head(x, labels)
    assert head.s.item() == 0.5
