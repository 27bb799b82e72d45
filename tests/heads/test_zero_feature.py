"""A zero feature (or one below F.normalize's eps) in every head that normalises features: cosines 0,
gradient 0 for that row, and every gradient finite and of the order of the scale s. F.normalize alone
divides by its eps there and passes back ~1e12 times the gradient (normalize_features, fast_cosine.py;
the fused backward of fused_margin.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

#: (config name, overrides): every head that normalises the features; both the fused training path
#: (fixed s) and the autograd paths (learnt s, sub-centres, heads that edit other columns)
NORMALISED = [
    ("normface", {}),
    ("normface", {"learnable_scale": True}),
    ("cosine", {}),
    ("coco", {}),
    ("amsoftmax", {}),
    ("cosface", {}),
    ("arcface", {}),
    ("arcface", {"mode": "straight_through"}),
    ("arcface", {"mode": "no_fallback"}),
    ("combined", {}),
    ("subcenter_arcface", {}),
    ("curricularface", {}),
    ("magface", {}),
    ("adaface", {}),
    ("l2softmax", {"alpha": 20.0}),
]


def scale_of(head) -> float:
    s = getattr(head, "alpha", None) or head.s
    return float(s.detach()) if isinstance(s, torch.Tensor) else float(s)


@pytest.mark.parametrize("name, overrides", NORMALISED, ids=[f"{n}{o}" for n, o in NORMALISED])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_zero_and_tiny_features_get_bounded_gradients(hh, name, overrides, autocast):
    head = hh.instantiate(name, in_features=8, num_classes=10, **overrides).train()
    x, labels = hh.make_batch(head, batch=8, special=False)
    x[2] = 0.0
    x[5] *= 1e-20 / x[5].norm()  # below eps: counts as zero too
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(x, labels)
        loss = F.cross_entropy(logits, labels)
    extra = head.extra_loss()
    (loss if extra is None else loss + extra).backward()
    s = scale_of(head)
    assert torch.isfinite(x.grad).all()
    assert (x.grad[[2, 5]] == 0).all(), "a zero feature has no direction: its gradient is 0"
    # every other row: ||dL/dx_b|| <= s ||dL/dlogit_b|| / ||x_b|| (|| . || of a CE row <= sqrt 2 / B)
    assert x.grad.norm(dim=1).max() <= 2.0 * s
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def _step(head, x, labels, autocast=False):
    """Logits and every gradient (x first) of one cross-entropy step (with the head's own loss term)."""
    x = x.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = head(x, labels)
        loss = F.cross_entropy(logits, labels)
    extra = head.extra_loss()
    (loss if extra is None else loss + extra).backward()
    return [logits.detach(), x.grad] + [p.grad for p in head.parameters() if p.requires_grad]


@pytest.mark.parametrize("name, overrides", NORMALISED, ids=[f"{n}{o}" for n, o in NORMALISED])
@pytest.mark.parametrize("tiny", [1e-11, 1e-6])
def test_near_zero_features_get_gradients_bounded_by_the_feature_eps(hh, name, overrides, tiny):
    """Issue #13: a feature of norm 1e-11 passed F.normalize's eps (1e-12) and got ~1e11 times the gradient;
    below FEATURE_EPS the normalisation is x / FEATURE_EPS in the forward and the backward alike."""
    from marginlab.heads.kernels import FEATURE_EPS

    head = hh.instantiate(name, in_features=8, num_classes=10, **overrides).train()
    x, labels = hh.make_batch(head, batch=4, special=False)
    x[1] = 0.0
    x[2] *= tiny / x[2].norm()
    grads = _step(head, x, labels)
    s = scale_of(head)
    assert all(torch.isfinite(g).all() for g in grads)
    assert x[2].norm() < FEATURE_EPS and grads[1].norm(dim=1).max() < 1e4 * s
    assert (grads[1][1] == 0).all()  # a zero feature still has no gradient


@pytest.mark.parametrize("name, overrides", NORMALISED, ids=[f"{n}{o}" for n, o in NORMALISED])
def test_normal_features_are_bitwise_unchanged_by_the_feature_eps(hh, name, overrides, monkeypatch):
    """Features above FEATURE_EPS give the very bits of F.normalize's eps (1e-12, the code before the floor)."""
    import copy

    import marginlab.heads.kernels.fast_cosine as fast

    head = hh.instantiate(name, in_features=8, num_classes=10, **overrides).train()
    x, labels = hh.make_batch(head, batch=6, special=False)
    x[3] *= 2e-3 / x[3].norm()  # small, but above the floor
    before = copy.deepcopy(head)  # buffers a training forward advances (EMAs, counters)
    floored = _step(head, x, labels)
    monkeypatch.setattr(fast, "FEATURE_EPS", fast.NORM_EPS)
    plain = _step(before, x, labels)
    for a, b in zip(floored, plain):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
