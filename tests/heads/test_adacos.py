"""AdaCos (no official code): equal to a float64 implementation of the paper's formulas (logits, dx, dW, the dynamic
scale over several steps), a hand-derived case, the scale's resume, chunked CE / Partial FC (fixed only), config,
advisor, CLI training + resume."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads import AdaCos, AdaCosHead
from marginlab.training.margin_feasibility import advise
from tests.conftest import last_weights

B, C, D = 6, 7, 5


def paper_step(x, w, y, s_prev, median="middle"):
    """AdaCos's dynamic scale by explicit loops in Python floats: B_avg over k != y_i, theta_med, s."""
    cos = [[sum(a * b for a, b in zip(xi, wj)) / math.sqrt(sum(a * a for a in xi) * sum(b * b for b in wj)) for wj in w]
           for xi in x]  # fmt: skip
    b_avg = sum(math.exp(s_prev * c) for i, row in enumerate(cos) for k, c in enumerate(row) if k != y[i]) / len(x)
    theta = sorted(math.acos(max(-1.0, min(1.0, cos[i][y[i]]))) for i in range(len(x)))
    n = len(theta)
    if n % 2 or median == "lower":
        med = theta[(n - 1) // 2]
    else:
        med = (theta[n // 2 - 1] + theta[n // 2]) / 2
    s = math.log(b_avg) / math.cos(min(math.pi / 4, med))
    return s, [[s * c for c in row] for row in cos]


def make(mode="dynamic", median="middle", **kw):
    torch.manual_seed(0)
    head = AdaCosHead(D, C, mode=mode, median=median, **kw).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return head, x, y


@pytest.mark.parametrize("median", ["middle", "lower"])
def test_dynamic_scale_equals_the_paper_over_several_steps(median):
    head, x, y = make(median=median)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    s = math.sqrt(2) * math.log(C - 1)  # AdaCos: s_0 = sqrt(2) log(C - 1)
    assert head.s.item() == pytest.approx(s, abs=1e-15)
    for _ in range(4):
        s, logits_ref = paper_step(x.tolist(), head.weight.detach().tolist(), y.tolist(), s, median)
        ref = torch.tensor(logits_ref, dtype=torch.float64).requires_grad_(False)
        # dx and dW of the paper's loss with s a constant: autograd on s * cos in float64
        xr, wr = x.clone().requires_grad_(True), head.weight.detach().clone().requires_grad_(True)
        F.cross_entropy(s * (F.normalize(xr) @ F.normalize(wr).T), y).backward()
        xo = x.clone().requires_grad_(True)
        opt.zero_grad()
        logits = head.train()(xo, y)
        F.cross_entropy(logits, y).backward()
        assert head.s.item() == pytest.approx(s, rel=1e-13)
        torch.testing.assert_close(logits.detach(), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(head.weight.grad, wr.grad, rtol=1e-12, atol=1e-12)
        opt.step()


@pytest.mark.parametrize(
    "median, expected",
    [
        # thetas 0 and pi/2: the middle median is pi/4, the lower one 0
        ("middle", math.sqrt(2) * math.log((3 + 2 ** math.sqrt(2)) / 2)),
        ("lower", math.log((3 + 2 ** math.sqrt(2)) / 2)),
    ],
)
def test_hand_derived_case(median, expected):
    """C = 3, W = I, both features (1, 0, 0), labels 0 and 1: s_0 = sqrt(2) ln 2, so e^(s_0 cos) is 2^sqrt(2) at
    cos 1 and 1 at cos 0; B_avg = (1 + 1 + 2^sqrt(2) + 1) / 2 (non-targets: 0, 0 | 1, 0)."""
    head = AdaCosHead(3, 3, median=median).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64)
    logits = head.train()(x, torch.tensor([0, 1]))
    assert head.s.item() == pytest.approx(expected, rel=1e-14)
    torch.testing.assert_close(logits, expected * torch.tensor([[1.0, 0, 0], [1.0, 0, 0]], dtype=torch.float64))


def test_fixed_scale_and_evaluation_leave_s_unchanged():
    head, x, y = make("fixed")
    assert head.s == math.sqrt(2) * math.log(C - 1) and "scale" not in head.state_dict()
    cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
    torch.testing.assert_close(head.train()(x, y), head.s * cos, rtol=1e-12, atol=1e-12)
    dyn, _, _ = make()
    dyn.eval()(x, y)
    assert dyn.s.item() == head.s  # evaluation forwards do not adapt s
    torch.testing.assert_close(dyn(x), head.s * cos, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(hh):
    """In eval mode (s held): in training s is a constant of the step, so its gradient is not differentiated."""
    head, x, y = make()
    hh.gradcheck_head(head, x, y)


def test_dynamic_scale_resumes_exactly():
    def train(head, opt, steps, x, y):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head.train()(x, y), y).backward()
            opt.step()

    head, x, y = make()
    start = copy.deepcopy(head.state_dict())
    opt = torch.optim.SGD(head.parameters(), lr=0.3, momentum=0.9)
    train(head, opt, 6, x, y)
    first, _, _ = make()
    first.load_state_dict(start)
    opt1 = torch.optim.SGD(first.parameters(), lr=0.3, momentum=0.9)
    train(first, opt1, 3, x, y)
    resumed, _, _ = make()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert resumed.s.item() == first.s.item() != start["scale"].item()
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.3, momentum=0.9)
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    train(resumed, opt2, 3, x, y)
    for key, value in head.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_fixed_mode_chunked_equals_the_logits_and_partial_fc_builds(hh):
    head, x, y = make("fixed", chunked=True)
    plain, _, _ = make("fixed")
    loss = head.train()(x, y).loss  # a chunked step returns its loss (HeadLoss)
    torch.testing.assert_close(loss, F.cross_entropy(plain.train()(x, y), y), rtol=1e-12, atol=1e-12)
    pfc = hh.instantiate("adacos", mode="fixed", partial_fc={"sample_rate": 0.5})
    assert type(pfc).__name__ == "PartialFC"


def test_dynamic_mode_refuses_chunked_and_partial_fc(hh):
    with pytest.raises(ConfigError, match=r"^chunked=true is not allowed with AdaCosHead mode=dynamic: "):
        AdaCosHead(D, C, chunked=True)
    assert AdaCosHead(D, C, chunked="auto").unchunkable is not None  # auto never chunks it
    with pytest.raises(ConfigError, match=r"^Partial FC cannot shard AdaCosHead: mode=dynamic adapts s"):
        hh.instantiate("adacos", partial_fc={"sample_rate": 0.5})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "auto"}, "mode='auto' is not allowed: it must be one of fixed, dynamic"),
        ({"median": "mean"}, "median='mean' is not allowed: it must be one of middle, lower"),
        ({"s": 30.0}, "s=30.0 is not allowed with AdaCosHead: its scale is sqrt(2) log(C - 1)"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        AdaCosHead(D, C, **kwargs)


def test_two_classes_are_refused():
    with pytest.raises(ConfigError, match=r"^num_classes=2 is not allowed with AdaCosHead: .* needs C >= 3$"):
        AdaCosHead(D, 2)


def test_config_builds_with_its_defaults(hh):
    head = hh.instantiate("adacos", in_features=8, num_classes=10)
    assert type(head) is AdaCos is AdaCosHead
    assert (head.mode, head.median) == ("dynamic", "middle")
    assert head.s.item() == pytest.approx(math.sqrt(2) * math.log(9), rel=1e-7)
    assert head.schedule_values() == {"s": pytest.approx(math.sqrt(2) * math.log(9), rel=1e-7)}


def test_margin_advisor_has_no_margin_to_check():
    assert advise(AdaCosHead(2, 10)) is None  # no margin: the advisor gives no verdict


def test_trains_and_resumes_exactly_through_the_cli(straight_and_resumed, metrics):
    straight, split = straight_and_resumed("logger=quiet", "trainer.epochs=2", "head=adacos")
    rows = metrics[1](straight)
    assert rows[-1]["test/acc"] > 0.5 and rows[-1]["head/s"] != pytest.approx(math.sqrt(2) * math.log(9))
    a, b = last_weights(straight), last_weights(split)
    assert "head.scale" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bf16_autocast_and_cos_pm1_and_zero_features_are_finite(hh):
    head = AdaCosHead(D, C)
    hh.check_bf16(head, *hh.make_batch(head, batch=B, seed=5))  # rows: cos = +1, cos = -1, zero norm
    assert torch.isfinite(head.s) and head.s.dtype == torch.float64
