"""The fused logits of fast_cosine.py against the plain formulation: values, exact gradients, blocks,
in-place edits, autocast, and the lazily computed probe cosines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import marginlab.heads.kernels.fast_cosine as fast
from marginlab.heads.kernels import fused_linear
from marginlab.heads.probe import scaled_cosine


@pytest.fixture(params=[None, 4], ids=["one-block", "blocks"])
def blocks(request, monkeypatch):
    """Runs a test with the backward in one block and in blocks of a few classes."""
    if request.param is not None:
        import marginlab.heads.rbf as rbf

        monkeypatch.setattr(fast, "BLOCK_ELEMENTS", request.param * 6)  # batch 6 -> 4 classes a block
        monkeypatch.setattr(rbf, "_BLOCK_ELEMENTS", request.param * 6)
    return request.param


def data(b=6, d=5, c=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (b,), generator=g)
    return x, w, labels


def reference(x, w, labels, normalize, s, margin):
    """The plain formulation: normalize(W) materialised, target replaced out of place."""
    weight = F.normalize(w) if normalize else w
    out = F.linear(x, weight)
    if s is not None:
        out = out.clamp(-s, s)
    if labels is None:
        return out
    target = out.gather(1, labels.view(-1, 1)).squeeze(1)
    norms = w[labels].norm(dim=1)
    return out.scatter(1, labels.view(-1, 1), margin(target, norms).view(-1, 1))


def fused(x, w, labels, normalize, s, margin):
    r = fused_linear(x, w, labels, normalize_weight=normalize, bound=s)
    if labels is None:
        return r.logits
    return r.replace_target(labels, margin(r.target, r.target_norm))


def margin(target, norms):  # any smooth function of the target entry and ||W_y||
    return 0.8 * target - 0.3 * torch.tanh(target) + 0.1 * norms


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_labels", [True, False])
def test_values_and_gradients_match_plain(blocks, normalize, with_labels):
    x, w, labels = data()
    labels = labels if with_labels else None
    s = 4.0 if normalize else None
    xs = (F.normalize(x) * 4.0) if normalize else x
    grads = []
    for fn in (reference, fused):
        xx, ww = xs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = fn(xx, ww, labels, normalize, s, margin)
        loss = F.cross_entropy(logits, labels if labels is not None else torch.zeros(6, dtype=torch.long))
        loss.backward()
        grads.append((logits.detach(), xx.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck(blocks, normalize):
    x, w, labels = data()
    s = 3.0 if normalize else None

    def fn(x_, w_):
        return fused(x_, w_, labels, normalize, s, margin)

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), w.requires_grad_(True)), eps=1e-6, atol=1e-6)


def test_float32_gradients_match_plain_at_scale():
    """Large-ish float32 case against the float64 plain formulation."""
    x, w, labels = data(b=64, d=32, c=3000, dtype=torch.float32, seed=1)
    xs = F.normalize(x) * 30.0
    out = []
    for fn, dtype in ((reference, torch.float64), (fused, torch.float32)):
        xx = xs.to(dtype).requires_grad_(True)
        ww = w.to(dtype).requires_grad_(True)
        F.cross_entropy(fn(xx, ww, labels, True, 30.0, lambda t, n: t - 10.0), labels).backward()
        out.append((xx.grad.double(), ww.grad.double()))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)


def test_undeclared_inplace_edit_uses_the_exact_fallback(blocks):
    """An in-place edit the Function was not told about: the gradient is still exact."""
    x, w, labels = data()
    xs = F.normalize(x) * 2.0
    grads = []
    for use_fused in (False, True):
        xx, ww = xs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if use_fused:
            logits = fused_linear(xx, ww, normalize_weight=True, bound=2.0).logits
        else:
            logits = F.linear(xx, F.normalize(ww)).clamp(-2.0, 2.0)
        logits.mul_(1.5).add_(0.25)
        F.cross_entropy(logits, labels).backward()
        grads.append((xx.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("normalize", [True, False])
def test_edit_after_replacement_uses_the_exact_fallback(blocks, normalize):
    x, w, labels = data()
    s = 2.0 if normalize else None
    xs = F.normalize(x) * 2.0
    grads = []
    for fn in (reference, fused):
        xx, ww = xs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = fn(xx, ww, labels, normalize, s, margin)
        if fn is reference:
            logits = logits.clone()
        logits.mul_(1.5).add_(0.25)
        F.cross_entropy(logits, labels).backward()
        grads.append((xx.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_zero_weight_row_and_zero_feature():
    x, w, labels = data()
    w[3] = 0.0
    x[0] = 0.0
    labels[1] = 3
    xs = F.normalize(x) * 2.0
    grads = []
    for fn in (reference, fused):
        xx, ww = xs.clone().requires_grad_(True), w.clone().requires_grad_(True)
        logits = fn(xx, ww, labels, True, 2.0, lambda t, n: t - 0.5)
        F.cross_entropy(logits, labels).backward()
        grads.append((logits.detach(), xx.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
        assert torch.isfinite(b).all()


def test_target_is_float64_precise_at_cos_minus_one():
    """The target entry of an antiparallel pair is -1 to float32 precision (acos-safe)."""
    torch.manual_seed(0)
    w = torch.randn(7, 16)
    labels = torch.tensor([2])
    x = F.normalize(-3.3 * w[2:3])
    r = fused_linear(x, w, labels, normalize_weight=True, bound=1.0)
    assert r.target.item() == -1.0


def test_bfloat16_autocast():
    x, w, labels = data(b=8, d=16, c=40, dtype=torch.float32)
    xs = (F.normalize(x) * 10.0).requires_grad_(True)
    w = w.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = fused_linear(xs, w, labels, normalize_weight=True, bound=10.0)
        logits = r.replace_target(labels, r.target - 3.0)
        loss = F.cross_entropy(logits, labels)
    assert logits.dtype == torch.float32 and r.target.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(xs.grad).all() and torch.isfinite(w.grad).all()
    expected = F.linear(xs.detach(), F.normalize(w.detach()))
    plain = logits.detach().clone()
    plain.scatter_(1, labels.view(-1, 1), expected.gather(1, labels.view(-1, 1)))
    torch.testing.assert_close(plain, expected, atol=0.1, rtol=2e-2)  # bfloat16 matmul


def test_scaled_cosine_leaves_the_logits_it_reads_unchanged():
    logits = torch.randn(3, 4) * 3
    before = logits.clone()
    torch.testing.assert_close(scaled_cosine(logits, col_scale=0.5), (logits * 0.5).clamp(-1, 1))
    assert torch.equal(logits, before)


def test_step_statistics_are_of_the_forward_weights():
    """The criterion takes a step's statistics with its loss, before the optimizer moves W (the head's pure
    ``cosine`` of that batch)."""
    from marginlab.geometry.stats import target_and_nearest_other
    from marginlab.heads.amsoftmax import AMSoftmaxHead
    from marginlab.losses import MarginLoss

    head = AMSoftmaxHead(8, 10, s=20.0, m=0.3)
    x = torch.randn(5, 8)
    labels = torch.arange(5)
    expected = F.linear(F.normalize(x), F.normalize(head.weight.detach())).clamp(-1, 1)
    step = MarginLoss(head).step(x, head(x, labels, stats=True), labels, stats=True)
    step.loss.backward()
    with torch.no_grad():
        head.weight.add_(1.0)  # an optimizer step after the criterion
    for got, want in zip(step.stats, target_and_nearest_other(expected, labels)):
        assert not got.requires_grad
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("host_checks", [True, False], ids=["cpu-path", "accelerator-path"])
@pytest.mark.parametrize("blocks", [None, 4], indirect=True, ids=["one-block", "blocks"])
def test_rbf_gradient_matches_autograd_including_clamped_entries(blocks, host_checks, monkeypatch):
    """RBF's fused backward against the same arithmetic in plain autograd, with features within
    rounding of their prototypes so that some distances come out negative and are clamped."""
    import math

    import marginlab.heads.rbf as rbf
    from marginlab.heads.rbf import _RBFLogits

    monkeypatch.setattr(rbf, "_host_checks", lambda x: host_checks)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(11, 5, generator=g) * 3.0
    x = torch.randn(6, 5, generator=g)
    x[:4] = w[[1, 4, 4, 7]] + 1e-4 * torch.randn(4, 5, generator=g)  # d ~ 1e-8: cancellation
    labels = torch.tensor([0, 2, 3, 5, 0, 2])  # not the prototypes they sit on: G there is ~1
    s, gamma = 35.0, 2.0
    log_s, inv_gamma = math.log(s), 1.0 / gamma

    def reference(x_, w_):
        x2 = torch.linalg.vecdot(x_, x_)
        w2 = torch.linalg.vector_norm(w_, dim=1).square()
        arg = torch.addmm((log_s - w2 * inv_gamma).unsqueeze(0), x_, w_.t(), alpha=2.0 * inv_gamma)
        return torch.exp((arg - (x2 * inv_gamma).unsqueeze(1)).clamp_max(log_s))

    grads = []
    for fused_path in (False, True):
        xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if fused_path:
            out = _RBFLogits.apply(xx, ww, s, gamma)
            assert (out == out.max()).sum() > 1, "no entry was clamped: the test lost its point"
        else:
            out = reference(xx, ww)
        F.cross_entropy(out, labels).backward()
        grads.append((out.detach(), xx.grad, ww.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("near", [True, False], ids=["near-prototypes", "far"])
def test_rbf_probe_cosines(near):
    """RBF's cosines (of the prototypes, not of its logits) match float64 near the prototypes and far off."""
    from marginlab.heads.rbf import RBFHead

    torch.manual_seed(0)
    head = RBFHead(8, 10, s=35.0, gamma=16.0)
    with torch.no_grad():
        head.weight.mul_(10.0)
    labels = torch.randint(0, 10, (12,))
    x = head.weight.detach()[labels] + 0.3 * torch.randn(12, 8) if near else 200.0 * torch.randn(12, 8)
    x[2] = 0.0
    expected = F.normalize(x.double()) @ F.normalize(head.weight.detach().double()).T
    torch.testing.assert_close(head.cosine(x).double(), expected, atol=1e-5, rtol=1e-5)


def _unfused(head_cls):
    """The head with the plain formulation: normalize(W) materialised, autograd scatter (the generic
    path of CosineMarginHead.logits, taken when normalized_cosine is overridden)."""

    class Unfused(head_cls):
        def normalized_cosine(self, embeddings):
            return F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1.0, 1.0)

    return Unfused


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("normface", {}),
        ("normface", {"learnable_scale": True}),
        ("amsoftmax", {}),
        ("cosface", {}),
        ("arcface", {}),
        ("arcface", {"easy_margin": True}),
        ("arcface", {"mode": "straight_through"}),
        ("combined", {}),
        ("combined", {"m1": 1.35, "m2": 0.0, "m3": 0.0}),
    ],
)
def test_cosine_heads_match_the_unfused_formulation(blocks, name, kwargs, hh):
    """Logits and every gradient of the fused cosine heads equal the plain formulation's (float64)."""
    fused_head = hh.instantiate(name, in_features=5, num_classes=11, **kwargs).double().train()
    plain_head = (
        _unfused(type(fused_head))(
            5,
            11,
            **{
                k: v
                for k, v in fused_head.__dict__.items()
                if k in ("s", "m", "m1", "m2", "m3", "easy_margin", "mode", "learnable_scale")
            },
        )
        .double()
        .train()
    )
    plain_head.load_state_dict(fused_head.state_dict())
    x, _, labels = data(b=6, d=5, c=11)
    results = []
    for head in (fused_head, plain_head):
        xx = x.clone().requires_grad_(True)
        logits = head(xx, labels)
        F.cross_entropy(logits, labels).backward()
        results.append([logits.detach(), xx.grad] + [p.grad for p in head.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def _plain_lsoftmax(head, x, labels):
    """L-Softmax / SphereFace logits as written before fusing: W[labels] gathered, autograd scatter."""
    from marginlab.heads.lsoftmax import psi

    weight = F.normalize(head.weight) if head.normalize_weights else head.weight
    wx = F.linear(x, weight)
    lam = head.current_lambda().to(wx.dtype)
    w_y = weight[labels]
    dot = (x * w_y).sum(dim=1)
    xw = x.norm(dim=1) * w_y.norm(dim=1)
    cos = (dot / xw.clamp_min(1e-12)).clamp(-1.0, 1.0)
    target = (lam * dot + xw * psi(cos, head.m)) / (1.0 + lam)
    return wx.scatter(1, labels.view(-1, 1), target.view(-1, 1))


@pytest.mark.parametrize("name", ["lsoftmax", "sphereface"])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_lsoftmax_heads_match_the_unfused_formulation(name, m, hh):
    head = hh.instantiate(name, in_features=5, num_classes=11, m=m).double().eval()
    with torch.no_grad():
        head.iteration.fill_(3000)  # lambda in the middle of its range
    x, _, labels = data(b=6, d=5, c=11)
    results = []
    for fn in (lambda xx: head(xx, labels), lambda xx: _plain_lsoftmax(head, xx, labels)):
        head.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        logits = fn(xx)
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), xx.grad, head.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_plain_path_used_under_compile_matches_the_fused_values_and_gradients():
    from marginlab.heads.kernels.fast_cosine import _plain_linear, fused_linear

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64)).requires_grad_()  # |cos| <= 1
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 3, 6, 2, 2, 5])
    results = []
    for make in (fused_linear, lambda *a, **k: _plain_linear(*a, k["normalize_weight"], k["bound"])):
        fused = make(x, w, labels, normalize_weight=True, bound=1.0)
        logits = fused.replace_target(labels, fused.target * 0.5)
        gx, gw = torch.autograd.grad((logits * torch.arange(7.0, dtype=torch.float64)).sum(), (x, w))
        results.append((logits.detach(), gx, gw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
