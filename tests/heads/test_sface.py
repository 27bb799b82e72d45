"""SFace: equal in float64 to a port of the official SFaceLoss (loss, dx, dW; the detached re-scaling weights), the
clamped acos where the official loss is NaN, its init, gradcheck, refusals, the margin advisor and a short CLI
training that resumes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.distributed.partial_fc import check_head_class
from marginlab.errors import ConfigError
from marginlab.heads import SFace, SFaceHead
from marginlab.heads.output import HeadLoss
from marginlab.training.margin_feasibility import advise

B, C, D = 7, 11, 6


def xavier_normal_(tensor, gain=1.0, mode="avg"):
    """zhongyy/SFace metrics.py's xavier_normal_ (the modes it uses)."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(tensor)
    fan = {"avg": fan_in + fan_out, "in": fan_in, "out": fan_out}[mode]
    return nn.init._no_grad_normal_(tensor, 0.0, gain * math.sqrt(2.0 / float(fan)))


class OfficialSFaceLoss(nn.Module):
    """zhongyy/SFace SFace_torch/head/metrics.py SFaceLoss (commit cb5ffb3c4863eecb3abf6a80529daffb05a0e820),
    forward copied as is with device_id=None."""

    def __init__(self, in_features, out_features, s=64.0, k=80.0, a=0.80, b=1.23):
        super().__init__()
        self.s, self.k, self.a, self.b = s, k, a, b
        self.weight = nn.Parameter(torch.FloatTensor(out_features, in_features))
        xavier_normal_(self.weight, gain=2, mode="out")

    def forward(self, input, label):
        cosine = F.linear(F.normalize(input), F.normalize(self.weight))
        output = cosine * self.s
        one_hot = torch.zeros(cosine.size(), dtype=cosine.dtype)
        one_hot.scatter_(1, label.view(-1, 1), 1)
        zero_hot = torch.ones(cosine.size(), dtype=cosine.dtype)
        zero_hot.scatter_(1, label.view(-1, 1), 0)
        WyiX = torch.sum(one_hot * output, 1)
        with torch.no_grad():
            theta_yi = torch.acos(WyiX / self.s)
            weight_yi = 1.0 / (1.0 + torch.exp(-self.k * (theta_yi - self.a)))
        intra_loss = -weight_yi * WyiX
        Wj = zero_hot * output
        with torch.no_grad():
            theta_j = torch.acos(Wj / self.s)
            weight_j = 1.0 / (1.0 + torch.exp(self.k * (theta_j - self.b)))
        inter_loss = torch.sum(weight_j * Wj, 1)
        loss = intra_loss.mean() + inter_loss.mean()
        Wyi_s = WyiX / self.s
        Wj_s = Wj / self.s
        return output, loss, intra_loss.mean(), inter_loss.mean(), Wyi_s.mean(), Wj_s.mean()


def pair(seed=0, **kw):
    torch.manual_seed(seed)
    head = SFaceHead(D, C, **kw).double()
    ref = OfficialSFaceLoss(D, C, s=head.s, k=head.k, a=head.a, b=head.b).double()
    with torch.no_grad():
        ref.weight.copy_(head.weight)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return head, ref, x, y


@pytest.mark.parametrize("kw", [{}, {"a": 0.87, "b": 1.2}, {"s": 10.0, "k": 5.0, "a": 1.5, "b": 1.6}])
def test_equals_the_official_loss_and_gradients_in_float64(kw):
    head, ref, x, y = pair(**kw)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = head.train()(xa, y)
    assert isinstance(out, HeadLoss) and out.loss.dim() == 0
    output, expected = ref(xb, y)[:2]
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.predicted, output.argmax(1))
    torch.testing.assert_close(head.eval()(x), output.detach(), rtol=0, atol=1e-12)  # the evaluation scores


def test_rescaling_weights_are_the_official_sigmoids():
    head, _, x, y = pair(a=0.87, b=1.2)
    scos = head.s * F.normalize(x) @ F.normalize(head.weight.detach()).T
    theta = torch.acos(scos / head.s)
    weights = head.rescaling_weights(scos, y)
    rows = torch.arange(B)
    torch.testing.assert_close(weights[rows, y], -1.0 / (1.0 + torch.exp(-80.0 * (theta[rows, y] - 0.87))))
    others = torch.ones(B, C, dtype=torch.bool)
    others[rows, y] = False
    torch.testing.assert_close(weights[others], 1.0 / (1.0 + torch.exp(80.0 * (theta[others] - 1.2))))
    assert not weights.requires_grad


def test_collinear_feature_is_finite_where_the_official_loss_is_nan():
    """A feature along its class weight: rounding puts W x / s just above 1, where the official acos is NaN."""
    head, ref, x, y = pair()
    with torch.no_grad():
        head.weight[y[0]] = torch.tensor([0.5, 0.75, -0.75, -0.5, -0.5, 0.25], dtype=torch.float64)
        ref.weight.copy_(head.weight)
    x[0] = 3.7 * head.weight.detach()[y[0]]
    raw = F.linear(F.normalize(x), F.normalize(ref.weight.detach()))[0, y[0]] * 64.0 / 64.0
    assert raw > 1.0  # (this feature's cosine rounds above 1)
    assert torch.isnan(ref(x, y)[1])
    out = head.train()(x.requires_grad_(True), y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_official_init_is_xavier_normal_gain_2_fan_out():
    torch.manual_seed(3)
    head = SFace(64, 50)
    torch.manual_seed(3)
    expected = xavier_normal_(torch.empty(50, 64), gain=2, mode="out")
    torch.testing.assert_close(head.weight.detach(), expected, rtol=0, atol=0)


def test_bf16_autocast_gives_a_finite_float32_loss_and_gradients(hh):
    head = SFaceHead(D, C)
    hh.check_loss_bf16(head, *hh.make_batch(head, batch=B))  # with a collinear, an opposite and a zero feature


def test_gradcheck_float64():
    """The weights are detached by design (official torch.no_grad): gradcheck the loss with them as constants, at
    a slope k small enough that finite differences do not cross their sigmoids' steps."""
    head, _, x, y = pair(s=4.0, k=1e-9)
    weight = head.weight.detach().clone().requires_grad_(True)

    def fn(x_, w_):
        return torch.func.functional_call(head, {"weight": w_}, (x_, y)).loss

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), weight), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"k": 0.0}, "k=0.0 is not allowed: it must lie in (0, inf]"),
        ({"a": -0.1}, "a=-0.1 is not allowed: it must lie in [0, 3.14159]"),
        ({"b": 4.0}, "b=4.0 is not allowed: it must lie in [0, 3.14159]"),
        ({"s": 0.0}, "s=0.0 is not allowed: it must lie in (0, inf]"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SFaceHead(D, C, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_partial_fc_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^Partial FC cannot shard SFaceHead: it is a loss of its own"):
        check_head_class(SFaceHead)


def test_margin_advisor_reads_b_minus_a_as_an_angular_margin():
    assert SFaceHead(2, 10, a=0.87, b=1.2).probe_margin.m2 == pytest.approx(0.33)
    assert advise(SFaceHead(2, 10, a=0.87, b=1.2)).verdict == "ok"  # 0.33 rad = 18.9 deg < 36 deg apart
    assert advise(SFaceHead(2, 10, a=0.5, b=1.2)).verdict == "infeasible"  # 40.1 deg > 36 deg
    assert advise(SFaceHead(2, 10, a=1.2, b=1.2)) is None  # b <= a: no margin


def test_trains_and_resumes_through_the_cli(hh, run_train, metrics, tmp_path, monkeypatch):
    a, b, split = hh.train_and_resume(run_train, tmp_path / "second", monkeypatch, "head=sface", "logger=quiet")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics[1](split)
    assert rows[-1]["test/acc"] > 0.3 and rows[-1]["train/nonfinite_steps"] == 0
