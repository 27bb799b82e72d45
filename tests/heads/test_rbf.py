"""RBF-Softmax head: s exp(-||x - W_j||^2 / gamma), the same in training and evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import marginlab.heads.rbf as rbf
from marginlab.errors import ConfigError
from marginlab.heads.rbf import RBFHead, _RBFLogits


def rbf_reference(x, weight, s, gamma):
    """float64 from explicit differences (B x C x D is fine at test sizes)."""
    diff = x.double().unsqueeze(1) - weight.double().unsqueeze(0)
    return s * torch.exp(-(diff * diff).sum(-1) / gamma)


def plain_rbf(x, weight, s, gamma):
    """The formula in plain autograd ops: s exp(-max(||x||^2 + ||W_j||^2 - 2 x.W_j, 0) / gamma)."""
    d = (x * x).sum(1, keepdim=True) + (weight * weight).sum(1) - 2.0 * x @ weight.t()
    return s * torch.exp(-d.clamp_min(0.0) / gamma)


@pytest.fixture(params=["factored", "exponent", "no-host-checks"])
def rbf_path(request, monkeypatch):
    """Runs a test on each path of _RBFLogits: factored logits (CPU), the row term in the exponent
    (CPU, as for features too large to factor) and the accelerator's (no host reads, a B x C mask)."""
    if request.param == "exponent":
        monkeypatch.setattr(rbf, "_factorable", lambda rows, log_s: False)
    elif request.param == "no-host-checks":
        monkeypatch.setattr(rbf, "_host_checks", lambda x: False)
    return request.param


@pytest.mark.parametrize("block_elements", [None, 3 * 7], ids=["one-block", "blocks"])
def test_fused_function_matches_the_plain_formula(rbf_path, block_elements, monkeypatch):
    """float64: _RBFLogits passes gradcheck, and its values and gradients equal the plain formula's,
    on every path, in one block of classes and in several (3 a block, the last one short)."""
    if block_elements is not None:
        monkeypatch.setattr(rbf, "_BLOCK_ELEMENTS", block_elements)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64)
    x = torch.randn(7, 5, generator=g, dtype=torch.float64) * 1.5
    x[2] = w[4] + 0.005  # d / gamma ~ 3e-5: its logit (near s) comes from the exponent when factored
    s, gamma = 35.0, 4.0

    def fused(x_, w_):
        return _RBFLogits.apply(x_, w_, s, gamma)

    leaves = (x.clone().requires_grad_(True), w.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(fused, leaves, eps=1e-6, atol=1e-7, rtol=1e-6)
    probe = torch.randn(7, 11, generator=g, dtype=torch.float64)
    results = []
    for fn in (fused, lambda x_, w_: plain_rbf(x_, w_, s, gamma)):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xx, ww)
        (out * probe).sum().backward()
        results.append((out.detach(), xx.grad, ww.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


def test_cosines_where_features_dwarf_prototypes():
    """Features of norm ~20 against prototypes of norm ~0.6 (a fresh head on unnormalised features): the pure
    ``cosine`` gives the cosines of float64 to 1e-6, whatever the logits' range."""
    head = RBFHead(64, 50)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 2.5
    expected = F.normalize(x.double()) @ F.normalize(head.weight.detach().double()).T
    torch.testing.assert_close(head.cosine(x).double(), expected, atol=1e-6, rtol=0)


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
    torch.testing.assert_close(got.double(), rbf_reference(x, head.weight.detach(), 35.0, 16.0), atol=1e-2, rtol=1e-3)


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


@pytest.mark.parametrize(
    "kwargs, pattern", [({"gamma": 0.0}, r"gamma=0.0 .*\(0, inf\]"), ({"gamma": -16.0}, r"gamma=-16.0")]
)
def test_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        RBFHead(8, 10, **kwargs)


def test_training_forward_under_torch_compile_matches_eager(hh):
    """Under torch.compile (aot_eager: graph capture without code generation) the fused Function gives the
    eager logits and gradients."""
    torch.manual_seed(0)
    head = hh.instantiate("rbf", in_features=4, num_classes=7).train()
    x, labels = hh.make_batch(head, batch=6, special=False)
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        head.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        forward = torch.compile(head, backend="aot_eager") if compiled else head
        logits = forward(xx, labels)
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), xx.grad, head.weight.grad))
    torch._dynamo.reset()
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
