"""UniFace: equal in float64 to a port of the official head.py (loss, dx, dW, db; shared and per-class b; class
sampling with r < 1), its b and init, gradcheck, exact resume of the class sample, refusals, the margin advisor and
a short CLI training that resumes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.distributed.partial_fc import check_head_class
from marginlab.errors import ConfigError
from marginlab.heads import UniFace, UniFaceHead
from marginlab.heads.output import HeadLoss
from marginlab.training.margin_feasibility import advise

B, C, D = 7, 11, 6


class OfficialUCE(nn.Module):
    """CVI-SZU/UniFace head.py (commit 00ade47075e26f24a96a1db718046b9af5f068ea), Unified_Cross_Entropy_Loss and
    (``per_class``) Normalized_BCE_Loss, forward copied as is (the .cuda() branch dropped). ``corrected`` indexes the
    per-class bias with partial_index, which the official code omits (a shape error whenever r < 1)."""

    def __init__(self, in_features, out_features, m=0.4, s=64, l=1.0, r=1.0, per_class=False, corrected=False):  # noqa: E741
        super().__init__()
        self.out_features, self.m, self.s, self.l, self.r = out_features, m, s, l, r
        self.corrected = corrected
        self.bias = nn.Parameter(torch.FloatTensor(1, out_features) if per_class else torch.FloatTensor(1))
        nn.init.constant_(self.bias, math.log(out_features * r * 10))
        self.weight = nn.Parameter(torch.FloatTensor(out_features, in_features))
        nn.init.kaiming_normal_(self.weight, a=1, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, input, label, partial_index):
        cos_theta = F.linear(F.normalize(input, eps=1e-5), F.normalize(self.weight[partial_index], eps=1e-5))
        bias = self.bias[:, partial_index] if self.corrected else self.bias

        cos_m_theta_p = self.s * (cos_theta - self.m) - bias
        cos_m_theta_n = self.s * cos_theta - bias
        p_loss = torch.log(1 + torch.exp(-cos_m_theta_p.clamp(min=-self.s, max=self.s)))
        n_loss = torch.log(1 + torch.exp(cos_m_theta_n.clamp(min=-self.s, max=self.s))) * self.l

        one_hot = torch.zeros((label.size(0), self.out_features), dtype=torch.bool)
        one_hot.scatter_(1, label.view(-1, 1).long(), 1)
        one_hot = torch.index_select(one_hot, 1, partial_index)

        loss = one_hot * p_loss + (~one_hot) * n_loss

        return loss.sum(dim=1).mean()


def pair(seed=0, **kw):
    """Our head and the official one with the same float64 weights and b; features and labels."""
    torch.manual_seed(seed)
    head = UniFaceHead(D, C, **kw).double()
    per_class = kw.get("bias") == "per_class"
    ref = OfficialUCE(D, C, m=head.m, s=head.s, l=head.l, r=head.r, per_class=per_class, corrected=per_class)
    ref = ref.double()
    with torch.no_grad():
        head.weight.normal_()
        head.b.add_(torch.randn_like(head.b))  # every b_j its own value
        ref.weight.copy_(head.weight)
        ref.bias.copy_(head.b.view_as(ref.bias))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    return head, ref, x, y


def compare(head, ref, x, y, partial_index):
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = head(xa, y)
    assert isinstance(out, HeadLoss) and out.loss.dim() == 0
    expected = ref(xb, y, partial_index)
    out.loss.backward()
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, ref.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(head.b.grad, ref.bias.grad.view_as(head.b), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", ["shared", "per_class"])
@pytest.mark.parametrize("m, l", [(0.4, 1.0), (0.2, 0.5)])  # noqa: E741
def test_equals_the_official_loss_and_gradients_in_float64(bias, m, l):  # noqa: E741
    head, ref, x, y = pair(bias=bias, m=m, l=l, s=16.0)  # s 16: the clamp to [-s, s] acts on some entries
    compare(head.train(), ref, x, y, torch.arange(C))


@pytest.mark.parametrize("bias", ["shared", "per_class"])
def test_class_sampling_equals_the_official_with_its_partial_index(bias):
    head, ref, x, y = pair(bias=bias, r=0.5)
    classes = head.sample(y)  # the step's draw, as the training forward will make it
    assert classes.numel() == int(C * 0.5) and set(y.tolist()) <= set(classes.tolist())
    compare(head.train(), ref, x, y, classes)
    assert int(head.step) == 1


def test_official_per_class_bias_fails_with_sampling():
    """The official Normalized_BCE_Loss adds its (1, C) bias to the (B, n) cosines of the sampled classes: a shape
    error whenever r < 1; ours takes b of the sampled classes (the ``corrected`` port above)."""
    _, ref, x, y = pair(bias="per_class", r=0.5)
    ref.corrected = False
    with pytest.raises(RuntimeError):
        ref(x, y, torch.unique(y))


def test_b_is_a_parameter_named_b_at_log_c_r_10():
    for bias, shape in (("shared", (1,)), ("per_class", (C,))):
        head = UniFace(D, C, r=0.3, bias=bias)
        assert isinstance(head.b, nn.Parameter) and head.b.shape == shape
        torch.testing.assert_close(head.b.detach(), torch.full(shape, math.log(C * 0.3 * 10)))
        assert "b" in dict(head.named_parameters()) and head.schedule_values() == {"b": pytest.approx(math.log(33))}


def test_official_init_is_kaiming_normal_fan_in_a1():
    torch.manual_seed(3)
    head = UniFaceHead(64, 50)
    torch.manual_seed(3)
    expected = nn.init.kaiming_normal_(torch.empty(50, 64), a=1, mode="fan_in", nonlinearity="leaky_relu")
    torch.testing.assert_close(head.weight.detach(), expected, rtol=0, atol=0)


def test_bf16_autocast_gives_a_finite_float32_loss_and_gradients(hh):
    head = UniFaceHead(D, C)
    hh.check_loss_bf16(head, *hh.make_batch(head, batch=B))  # with a collinear, an opposite and a zero feature


def test_gradcheck_float64():
    head, _, x, y = pair(bias="per_class", s=8.0)
    head.eval()
    names = [n for n, _ in head.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in head.named_parameters()]

    def fn(x_, *ps):
        return torch.func.functional_call(head, dict(zip(names, ps)), (x_, y)).loss

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(True), *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_eval_scores_and_predictions():
    head, _, x, y = pair(bias="per_class")
    scores = head.eval()(x)
    expected = head.s * F.normalize(x) @ F.normalize(head.weight.detach()).T - head.b.detach()
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(head(x, y).predicted, expected.argmax(1))
    assert int(head.step) == 0  # evaluation draws nothing


def train_steps(head, steps, x, y, opt_state=None):
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for i in range(steps):
        opt.zero_grad()
        head(x[i], y[i]).loss.backward()
        opt.step()
    return opt


def test_resume_of_the_class_sample_is_bit_exact():
    torch.manual_seed(0)
    head = UniFaceHead(D, 40, r=0.25, seed=7).train()
    x, y = torch.randn(6, 5, D), torch.randint(0, 40, (6, 5))
    straight = copy.deepcopy(head)
    train_steps(straight, 6, x, y)
    first = copy.deepcopy(head)
    opt = train_steps(first, 3, x, y)
    resumed = UniFaceHead(D, 40, r=0.25, seed=7).train()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert int(resumed.step) == 3
    train_steps(resumed, 3, x[3:], y[3:], copy.deepcopy(opt.state_dict()))
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    other_seed = UniFaceHead(D, 40, r=0.25, seed=8)
    other_seed.load_state_dict(first.state_dict())
    assert not torch.equal(other_seed.sample(y[3]), first.sample(y[3]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0.0}, "r=0.0 is not allowed: it must lie in (0, 1]"),
        ({"l": 0.0}, "l=0.0 is not allowed: it must lie in (0, inf]"),
        ({"m": -0.1}, "m=-0.1 is not allowed: it must lie in [0, 2]"),
        ({"bias": "row"}, "bias='row' is not allowed: it must be one of shared, per_class"),
        ({"seed": -1}, "seed=-1 is not allowed: it must be an integer >= 0"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        UniFaceHead(D, C, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_partial_fc_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^Partial FC cannot shard UniFaceHead: it is a loss of its own"):
        check_head_class(UniFaceHead)


def test_margin_advisor_reads_the_cosine_margin():
    assert advise(UniFaceHead(2, 10, m=0.1)).verdict == "ok"  # 36 deg apart: cos 0 - cos 36 = 0.19 > 0.1
    assert advise(UniFaceHead(2, 10, m=0.4)).verdict == "infeasible"  # 1 - cos 36 deg = 0.19 < 0.4


def test_trains_and_resumes_through_the_cli(hh, run_train, metrics, tmp_path, monkeypatch):
    run = ["head=uniface", "head.r=0.5", "m=0.1", "s=16", "logger=quiet"]
    a, b, split = hh.train_and_resume(run_train, tmp_path / "second", monkeypatch, *run)
    assert int(a["head.step"]) > 0 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics[1](split)
    assert rows[-1]["train/acc"] > 0.2 and rows[-1]["train/nonfinite_steps"] == 0
