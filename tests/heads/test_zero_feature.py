"""A zero feature (or one below F.normalize's eps) in every head that normalises features: cosines 0,
gradient 0 for that row, and every gradient finite and of the order of the scale s. F.normalize alone
divides by its eps there and passes back ~1e12 times the gradient (normalize_features, fast_cosine.py;
the fused backward of fused_margin.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.heads.output import HeadLoss

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


def _loss_and_grads(head, x, labels):
    """The loss (CE of the logits, or a chunked head's own) with the head's term, and d loss / dx, d loss / dW."""
    x = x.clone().requires_grad_(True)
    out = head(x, labels)
    loss = out.loss if isinstance(out, HeadLoss) else F.cross_entropy(out, labels)
    extra = head.extra_loss()
    loss = loss if extra is None else loss + extra
    return (loss.detach(), *torch.autograd.grad(loss, [x, head.weight]))


def _paths(head):
    """The head's training paths: its own, the autograd one (as torch.compile traces it: normalize_features
    and plain ops) and the chunked loss where the head can be chunked."""
    import copy

    from marginlab.heads.base import CosineMarginHead, chunkable_problem

    paths = {"default": (copy.deepcopy(head), False)}
    if isinstance(head, CosineMarginHead):
        paths["autograd"] = (copy.deepcopy(head), True)
        if chunkable_problem(type(head)) is None:
            chunked = copy.deepcopy(head)
            chunked.chunked = True
            paths["chunked"] = (chunked, False)
    return paths


@pytest.mark.parametrize("name, overrides", NORMALISED, ids=[f"{n}{o}" for n, o in NORMALISED])
@pytest.mark.parametrize("side", ["below", "at", "above"])
def test_every_path_agrees_at_the_feature_floor(hh, name, overrides, side, monkeypatch):
    """Issue #22: at ||x|| = FEATURE_EPS exactly the autograd path (clamp_min, whose gradient is 0 at the bound)
    dropped the radial projection that the fused and chunked backwards keep. One rule (``above_floor``) for
    all: at and above the floor the logits depend on x / ||x|| alone, so dx is orthogonal to x; below it
    x / FEATURE_EPS scales with x, and dx is not. Value and gradients agree between the paths (float64)."""
    from marginlab.heads.kernels import FEATURE_EPS

    torch.manual_seed(0)
    head = hh.instantiate(name, in_features=6, num_classes=7, **overrides).double().train()
    x, labels = hh.make_batch(head, batch=5, special=False)
    x = x.double()
    norm = {"below": math.nextafter(FEATURE_EPS, 0.0), "at": FEATURE_EPS, "above": math.nextafter(FEATURE_EPS, 1)}
    x[1] = 0.0
    x[1, 2] = norm[side]  # on one axis, so the computed norm is exactly this one
    assert torch.linalg.vector_norm(x[1]).item() == norm[side]
    results = {}
    for path, (twin, compiling) in _paths(head).items():
        with monkeypatch.context() as patch:
            if compiling:  # the compiled form: fused_linear's plain product, the margin by autograd ops
                patch.setattr(torch.compiler, "is_compiling", lambda: True)
            results[path] = _loss_and_grads(twin, x, labels)
        dx = results[path][1][1]
        radial = abs(float(dx @ x[1])) / (float(dx.norm()) * norm[side])
        if side == "below":
            assert radial > 1e-3, f"{path}: below the floor x / FEATURE_EPS scales with x"
        else:
            assert radial < 1e-9, f"{path}: at and above the floor dx is orthogonal to x ({radial})"
    default = results.pop("default")
    for path, got in results.items():
        for what, a, b in zip(("loss", "dx", "dW"), got, default):
            # (atol relative to the largest entry: dx's radial entry is a rounding-sized difference of ~1e4s)
            atol = 1e-12 * max(1.0, float(b.abs().max()))
            torch.testing.assert_close(
                a, b, rtol=1e-9, atol=atol, msg=lambda m, p=path, w=what: f"{p} vs default, {w}: {m}"
            )


@pytest.mark.parametrize("name, overrides", NORMALISED, ids=[f"{n}{o}" for n, o in NORMALISED])
@pytest.mark.parametrize("path", ["eval", "train", "chunked"])
def test_probe_cosines_below_the_floor_are_those_of_the_normalised_feature(hh, name, overrides, path, tmp_path):
    """Issue #22: below the floor the probe's cosines were read off logits / s, i.e. off x / FEATURE_EPS, and
    shrank by ||x|| / FEATURE_EPS (cos theta_y ~ 0, theta_y ~ 90 degrees for any direction). They are the
    cosines of x / ||x|| with the class weights, on every path (evaluation, training, chunked) and in the probe."""
    from marginlab.geometry.probe import GeometryProbe
    from marginlab.geometry.stats import target_and_nearest_other
    from marginlab.heads.base import chunkable_problem
    from marginlab.heads.kernels import FEATURE_EPS
    from marginlab.losses import MarginLoss

    torch.manual_seed(0)
    head = hh.instantiate(name, in_features=6, num_classes=7, **overrides)
    if path == "chunked":
        if not hasattr(head, "chunked") or chunkable_problem(type(head)) is not None:
            pytest.skip("this head has no chunked loss")
        head.chunked = True
    x, labels = hh.make_batch(head, batch=5, special=False)
    x[1] *= 1e-6 / x[1].norm()  # far below the floor
    x[3] *= 0.5 * FEATURE_EPS / x[3].norm()
    # float64 reference: cos(x / ||x||, W_y), the best of a class's rows with sub-centres (max pooling)
    unit = F.normalize(x.double(), dim=1)
    w = F.normalize(head.weight.detach().double(), dim=1).view(head.num_classes, -1, x.shape[1])
    expected = torch.einsum("bd,ckd->bck", unit, w).amax(dim=2)
    cos = None
    if path == "eval":
        cos = head.eval().cosine(x)
        nearest = target_and_nearest_other(cos, labels)
    else:  # a training step's statistics: the chunked loss's own, else from the head's pure cosine
        nearest = MarginLoss(head.train()).step(x, head(x, labels, stats=True), labels, stats=True).stats
    want = target_and_nearest_other(expected, labels)
    for got, ref in zip(nearest, want):
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    if cos is None:  # (a chunked step keeps the two B-vectors alone; the probe samples evaluation batches)
        return
    torch.testing.assert_close(cos.double(), expected, atol=1e-5, rtol=1e-5)
    probe = GeometryProbe(tmp_path, max_samples=16, figures=False)
    probe.collect(x, cos, labels, labels, nearest=nearest)
    target_deg = torch.rad2deg(torch.acos(want[0].clamp(-1, 1)))
    torch.testing.assert_close(probe.parts["target"][0].double(), target_deg, atol=2e-3, rtol=0)
