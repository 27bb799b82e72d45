"""X2-Softmax head: equal in float64 to a port of the official code (straight_through) and to the paper's loss
differentiated (exact); chunked CE and Partial FC; the margin advisor's verdict; training + resume via the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads import X2Softmax
from marginlab.heads.normface import NormFaceHead
from marginlab.heads.x2softmax import X2SoftmaxHead
from marginlab.training.margin_feasibility import advise
from tests.heads.checks import check_resume_exact, loss_and_grads
from tests.heads.checks import float64_batch as batch

S, A, H, K = 16.0, -0.9, -0.1, 0.65


def official_x2softmax_loss(x, weight, labels, s, a, h, k):
    """XieZixiUSTC/X2-Softmax (9899232) backbones.py my_CE_2 + loss.py X2Softmax, line for line (no cuda)."""
    logits = F.linear(F.normalize(x), F.normalize(weight))
    index = torch.where(labels != -1)[0]
    target_logit = logits[index, labels[index].view(-1)]
    with torch.no_grad():
        target_logit.arccos_()
        final_target_logit = a * (target_logit - h) ** 2 + k
        logits[index, labels[index].view(-1)] = final_target_logit
    logits = logits * s
    return F.cross_entropy(logits, labels)


def paper_x2softmax_loss(x, weight, labels, s, a, h, k):
    """The paper's loss with autograd through the quadratic: CE of s cos theta_j, target s (a (theta - h)^2 + k)."""
    cos = F.linear(F.normalize(x), F.normalize(weight))
    theta = torch.acos(cos.gather(1, labels.view(-1, 1)))
    return F.cross_entropy((s * cos).scatter(1, labels.view(-1, 1), s * (a * (theta - h) ** 2 + k)), labels)


@pytest.mark.parametrize("mode", ["straight_through", "exact"])
@pytest.mark.parametrize("chunked", [False, True])
def test_equals_the_official_port_and_the_paper_in_float64(mode, chunked):
    head = X2SoftmaxHead(8, 10, s=S, a=A, h=H, k=K, mode=mode, chunked=chunked).double().train()
    x, labels = batch()
    reference = official_x2softmax_loss if mode == "straight_through" else paper_x2softmax_loss
    expected = loss_and_grads(lambda x_, w: reference(x_, w, labels, S, A, H, K), x, head.weight)

    def ours(x_, w):
        with torch.no_grad():
            head.weight.copy_(w)
        return head.chunked_loss(x_, labels).loss if chunked else F.cross_entropy(head(x_, labels), labels)

    x_ = x.clone().requires_grad_(True)
    loss = ours(x_, head.weight.detach())
    got = (loss, *torch.autograd.grad(loss, [x_, head.weight]))
    for name, g, e in zip(("loss", "dx", "dW"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12, msg=name)


def test_official_defaults_and_the_paper_names_export():
    assert X2Softmax is X2SoftmaxHead
    head = X2SoftmaxHead(8, 10)
    assert (head.s, head.a, head.h, head.k, head.mode) == (64.0, -0.9, 0.0, 0.65, "straight_through")
    assert head.official_init == "normal_0.01"


def test_a_target_cosine_rounded_past_one_is_no_nan():
    """The official arccos_ of the unclamped product gives NaN at a cosine rounded above 1; ours clamps."""
    head = X2SoftmaxHead(8, 10, a=A, h=H, k=K, mode="exact")
    cos = torch.tensor([1.0 + 1e-7, -1.0 - 1e-7, 1.0], dtype=torch.float64)
    assert torch.isnan(torch.acos(cos[:2])).all()  # what the official code computes there
    value, slope = head.margin_and_slope(cos)
    assert torch.isfinite(value).all() and torch.isfinite(slope).all()
    torch.testing.assert_close(value[0], torch.tensor(A * H**2 + K, dtype=torch.float64))
    assert value[0] == value[2]
    # within 1e-7 of cos = 1 the slope -2a (theta / sin - h / sin) takes theta / sin -> 1 and drops h / sin
    torch.testing.assert_close(slope[[0, 2]], torch.full((2,), -2.0 * A, dtype=torch.float64))


def test_exact_slope_at_cos_one_is_its_limit_with_h_zero():
    head = X2SoftmaxHead(8, 10, a=A, h=0.0, k=K, mode="exact")
    _, slope = head.margin_and_slope(torch.tensor([1.0, math.cos(1e-3)], dtype=torch.float64))
    torch.testing.assert_close(slope, torch.full((2,), -2.0 * A, dtype=torch.float64), atol=1e-6, rtol=0)


def test_gradcheck_float64_exact(hh):
    head = X2SoftmaxHead(6, 5, s=4.0, a=A, h=H, k=K, mode="exact")
    x, labels = hh.make_batch(head, batch=6, special=False)
    hh.gradcheck_head(head, x, labels)


def test_straight_through_backpropagates_the_logits_gradient_as_normface(hh):
    """The official no_grad edit: d logit / d cos theta_y = s, as if the target logit were s cos theta_y."""
    head = X2SoftmaxHead(6, 5, s=4.0, a=A, h=H, k=K).double()
    ref = hh.copy_weights(head, NormFaceHead(6, 5, s=4.0).double())
    x, labels = hh.make_batch(head, batch=6, special=False)
    x = x.double().requires_grad_(True)
    upstream = torch.randn(6, 5, dtype=torch.float64)
    ours = torch.autograd.grad((head(x, labels) * upstream).sum(), [x, head.weight])
    theirs = torch.autograd.grad((ref(x, labels) * upstream).sum(), [x, ref.weight])
    for g, e in zip(ours, theirs):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def test_bf16_autocast_and_the_awkward_rows_are_finite(hh):
    head = X2SoftmaxHead(8, 10, mode="exact")
    x, labels = hh.make_batch(head, batch=12)
    hh.check_bf16(head, x, labels)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"a": 0.0}, "a=0.0 is not allowed: it must lie in [-inf, 0)"),
        ({"a": 0.5}, "a=0.5 is not allowed: it must lie in [-inf, 0]"),
        ({"h": 0.2}, "h=0.2 is not allowed: it must lie in [-3.14159, 0]"),
        ({"k": 1.5}, "k=1.5 is not allowed: it must lie in [-1, 1]"),
        ({"s": 0.0}, "s=0.0 is not allowed"),
        ({"mode": "autograd"}, "mode='autograd' is not allowed: it must be one of straight_through, exact"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_key(kwargs, words):
    with pytest.raises(ConfigError) as err:
        X2SoftmaxHead(8, 10, **kwargs)
    assert str(err.value).startswith(words)


def test_the_margin_advisor_gives_a_verdict():
    """Ten classes in 2-D are 36 deg apart: the official f(0) = k = 0.65 < cos 36 deg = 0.81 cannot be met there,
    while k = 0.95 leaves the margin most of each class's cap."""
    assert advise(X2SoftmaxHead(2, 10)).verdict == "infeasible"
    advice = advise(X2SoftmaxHead(2, 10, s=10.0, a=-0.9, h=0.0, k=0.95))
    assert advice.verdict == "ok" and 5.0 < advice.cap_deg < 18.0
    assert advise(X2SoftmaxHead(512, 10_572)).verdict == "ok"


def test_config_builds_with_the_official_defaults(hh):
    head = hh.instantiate("x2softmax")
    assert isinstance(head, X2SoftmaxHead)
    assert (head.s, head.a, head.h, head.k, head.mode, head.chunked) == (64.0, -0.9, 0.0, 0.65, "straight_through", 0)


def test_trains_with_partial_fc_and_resumes_exactly_through_the_cli(run_train, metrics, tmp_path, monkeypatch):
    last = check_resume_exact(
        run_train, metrics, tmp_path, monkeypatch, "head=x2softmax", "head.k=0.95", "head.partial_fc.sample_rate=0.5"
    )
    assert last["train/nonfinite_steps"] == 0
