"""AdaFace: reference loops, gradients, reductions (m=0 NormFace, h=0 CosFace), bf16, buffers, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from marginlab.errors import ConfigError
from marginlab.heads.adaface import AdaFaceHead
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.normface import NormFaceHead

B, C, D = 6, 5, 4
EPS = 1e-3


def reference_cosines(x, w):
    out = []
    for xi in x.tolist():
        nx = math.sqrt(sum(v * v for v in xi))
        row = []
        for wj in w.tolist():
            nw = math.sqrt(sum(v * v for v in wj))
            row.append(sum(a * b for a, b in zip(xi, wj)) / (nx * nw))
        out.append(row)
    return out


def reference_logits(x, w, y, s, m, h, t_alpha, mean_old, std_old):
    norms = [min(100.0, max(0.001, math.sqrt(sum(v * v for v in xi)))) for xi in x.tolist()]
    n = len(norms)
    batch_mean = sum(norms) / n
    batch_std = math.sqrt(sum((v - batch_mean) ** 2 for v in norms) / (n - 1))
    mean = t_alpha * batch_mean + (1 - t_alpha) * mean_old
    std = t_alpha * batch_std + (1 - t_alpha) * std_old
    out = []
    for i, row in enumerate(reference_cosines(x, w)):
        scaler = max(-1.0, min(1.0, (norms[i] - mean) / (std + EPS) * h))
        logits = []
        for j, c in enumerate(row):
            c = max(-1 + EPS, min(1 - EPS, c))
            if j == y[i].item():
                angle = max(EPS, min(math.pi - EPS, math.acos(c) - m * scaler))
                logits.append(s * (math.cos(angle) - (m + m * scaler)))
            else:
                logits.append(s * c)
        out.append(logits)
    return torch.tensor(out, dtype=torch.float64), mean, std


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = AdaFaceHead(D, C).double()
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * torch.linspace(5, 40, B).view(-1, 1).double()
    y = torch.randint(0, C, (B,), generator=g)
    with torch.no_grad():
        x[0] = 30.0 * F.normalize(head.weight[y[0]], dim=0)  # cos theta_y = +1
        x[1] = -10.0 * F.normalize(head.weight[y[1]], dim=0)  # cos theta_y = -1
    return head, x, y


def test_matches_reference_loops_including_cos_pm1():
    head, x, y = make_inputs()
    with torch.no_grad():
        head.batch_mean.fill_(18.0)
        head.batch_std.fill_(6.0)
    head.train()
    out = head(x, y)
    ref, mean, std = reference_logits(x, head.weight.detach(), y, 64.0, 0.4, 0.333, 0.01, 18.0, 6.0)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    assert head.batch_mean.item() == pytest.approx(mean, abs=1e-12)
    assert head.batch_std.item() == pytest.approx(std, abs=1e-12)
    assert head.schedule_values() == {"batch_mean": pytest.approx(mean), "batch_std": pytest.approx(std)}


def test_buffers_update_only_in_training_and_batch_of_one_keeps_std():
    head, x, y = make_inputs(1)
    head.eval()
    head(x, y)
    assert (head.batch_mean.item(), head.batch_std.item()) == (20.0, 100.0)
    head.train()
    out = head(x[:1], y[:1])
    assert torch.isfinite(out).all() and head.batch_std.item() == 100.0 and head.batch_mean.item() != 20.0


def test_gradcheck_float64():
    """The norms are detached by design (official code), so the margin is a stop-gradient function of
    ||x||: weights are checked with a live scaler, embeddings with the scaler saturated at +-1."""
    head, _, y = make_inputs(2)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * 10).requires_grad_(True)
    w = head.weight.detach().clone().requires_grad_(True)
    head.eval()  # fixed buffers: the same function at every gradcheck evaluation
    with torch.no_grad():
        head.batch_mean.fill_(15.0)
        head.batch_std.fill_(5.0)
    on_w = lambda w_: functional_call(head, {"weight": w_}, (x.detach(), y))  # noqa: E731
    assert torch.autograd.gradcheck(on_w, (w,), eps=1e-6, atol=1e-5)
    norms = x.detach().norm(dim=1)
    with torch.no_grad():
        head.batch_mean.fill_(norms.median().item() + 0.5)
        head.batch_std.fill_(1e-3)
    assert ((norms - head.batch_mean).abs() * 0.333 / (2e-3) > 1.1).all()  # every scaler clipped
    on_x = lambda x_, w_: functional_call(head, {"weight": w_}, (x_, y))  # noqa: E731
    assert torch.autograd.gradcheck(on_x, (x, w), eps=1e-6, atol=1e-5)


def test_norm_gets_no_gradient_and_steers_the_margin():
    head, x, y = make_inputs(7)
    head.eval()
    with torch.no_grad():
        head.batch_mean.fill_(20.0)
        head.batch_std.fill_(1.0)
    direction = F.normalize(torch.randn(1, D, dtype=torch.float64), dim=1)
    label = torch.tensor([0])
    low, high = head(direction * 5.0, label), head(direction * 35.0, label)  # scaler -1 vs +1
    torch.testing.assert_close(low[:, 1:], high[:, 1:])
    cos = (F.normalize(direction) @ F.normalize(head.weight.detach()).T)[0, 0].item()
    theta = math.acos(cos)
    assert low[0, 0].item() == pytest.approx(64 * math.cos(theta + 0.4), abs=1e-9)  # ArcFace-like end
    assert high[0, 0].item() == pytest.approx(64 * (math.cos(max(EPS, theta - 0.4)) - 0.8), abs=1e-9)


def test_m0_is_normface_and_h0_is_cosface():
    head, x, y = make_inputs(4)
    x = x[2:]
    y = y[2:]  # away from cos = +-1, where AdaFace clamps to 1 - 1e-3
    norm = NormFaceHead(D, C, s=64.0).double()
    cosface = AMSoftmaxHead(D, C, s=64.0, m=0.4).double()
    zero = AdaFaceHead(D, C, m=0.0).double()
    flat = AdaFaceHead(D, C, h=0.0).double()
    for other in (norm, cosface, zero, flat):
        other.weight.data.copy_(head.weight.data)
    torch.testing.assert_close(zero(x, y), norm(x, y))
    torch.testing.assert_close(flat(x, y), cosface(x, y))
    torch.testing.assert_close(head(x), norm(x))


def test_bf16_autocast_zero_norm_and_collinear_are_finite(hh):
    head = AdaFaceHead(D, C)
    hh.check_bf16(head, *hh.make_batch(head, batch=B, seed=5))  # rows: cos = +1, cos = -1, zero norm
    assert torch.isfinite(head.batch_mean).all() and torch.isfinite(head.batch_std).all()


def test_buffers_round_trip_through_state_dict():
    head, x, y = make_inputs(6)
    head.train()
    for _ in range(3):
        head(x, y)
    state = head.state_dict()
    assert {"weight", "batch_mean", "batch_std"} <= set(state)
    other = AdaFaceHead(D, C).double()
    other.load_state_dict(state)
    assert other.batch_mean.item() == head.batch_mean.item() != 20.0
    assert other.batch_std.item() == head.batch_std.item() != 100.0


@pytest.mark.parametrize(
    "kwargs, name, allowed",
    [
        ({"t_alpha": 0.0}, "t_alpha", "(0, 1]"),
        ({"t_alpha": 2.0}, "t_alpha", "(0, 1]"),
        ({"h": -0.1}, "h", "[0, 10]"),
        ({"m": 2.0}, "m", "[0, 1.5708]"),
        ({"s": -1.0}, "s", "(0, inf]"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        AdaFaceHead(D, C, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)


def test_config_file_builds_the_head_with_its_defaults(hh):
    head = hh.instantiate("adaface", in_features=8, num_classes=10)
    assert type(head) is AdaFaceHead
    for key, value in {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01}.items():
        assert getattr(head, key) == value
    x, labels = hh.make_batch(head)
    hh.check_bf16(head, x, labels)
    hh.check_probe_cosine(head, x, labels)
