"""CurricularFace: reference loops, gradients, reduction to ArcFace/NormFace, bf16, buffer, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from marginlab.errors import ConfigError
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.curricularface import CurricularFaceHead

B, C, D = 6, 5, 4


def reference_cosines(x, w):
    """cos(theta_ij) by explicit loops in float64 Python arithmetic."""
    out = []
    for xi in x.tolist():
        nx = math.sqrt(sum(v * v for v in xi))
        row = []
        for wj in w.tolist():
            nw = math.sqrt(sum(v * v for v in wj))
            row.append(max(-1.0, min(1.0, sum(a * b for a, b in zip(xi, wj)) / (nx * nw))))
        out.append(row)
    return out


def reference_logits(x, w, y, s, m, t_old, momentum):
    cos = reference_cosines(x, w)
    labels = y.tolist()
    t = momentum * sum(cos[i][labels[i]] for i in range(len(labels))) / len(labels) + (1 - momentum) * t_old
    out = []
    for i, row in enumerate(cos):
        theta = math.acos(row[labels[i]])
        raw = math.cos(theta + m)
        target = raw if theta < math.pi - m else row[labels[i]] - m * math.sin(m)
        logits = []
        for j, c in enumerate(row):
            if j == labels[i]:
                logits.append(s * target)
            elif c > raw:
                logits.append(s * c * (t + c))
            else:
                logits.append(s * c)
        out.append(logits)
    return torch.tensor(out, dtype=torch.float64), t


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = CurricularFaceHead(D, C, s=64.0, m=0.5).double()
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    with torch.no_grad():
        x[0] = 3.0 * head.weight[y[0]]  # cos theta_y = +1
        x[1] = -2.0 * head.weight[y[1]]  # cos theta_y = -1 (fallback branch)
    return head, x, y


def test_matches_reference_loops_including_cos_pm1():
    head, x, y = make_inputs()
    head.t.fill_(0.2)
    head.train()
    out = head(x, y)
    ref, t_new = reference_logits(x, head.weight.detach(), y, 64.0, 0.5, 0.2, 0.01)
    # rows 0-1 sit at cos = +-1, where sin(theta) is floored at 1e-6 (finite gradients): s * 1e-6 slack
    torch.testing.assert_close(out[:2], ref[:2], rtol=0, atol=64 * 1e-6)
    torch.testing.assert_close(out[2:], ref[2:], rtol=1e-9, atol=1e-9)
    assert head.t.item() == pytest.approx(t_new, abs=1e-12)


def test_t_is_an_ema_updated_only_in_training():
    head, x, y = make_inputs(1)
    head.eval()
    head(x, y)
    assert head.t.item() == 0.0
    head.train()
    head(x, y)
    cos_y = F.normalize(x).mul(F.normalize(head.weight.detach())[y]).sum(1)
    assert head.t.item() == pytest.approx(0.01 * cos_y.mean().item(), abs=1e-12)
    assert head.schedule_values() == {"t": pytest.approx(head.t.item())}


def test_gradcheck_float64():
    head, _, y = make_inputs(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = head.weight.detach().clone().requires_grad_(True)
    head.t.fill_(0.3)
    head.eval()  # freeze t so every gradcheck evaluation sees the same function
    fn = lambda x_, w_: functional_call(head, {"weight": w_}, (x_, y))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-5)


def test_without_hard_negatives_it_is_arcface_and_eval_is_normface():
    torch.manual_seed(4)
    dim = 8  # orthogonal class weights need D >= C
    head = CurricularFaceHead(dim, C, s=30.0, m=0.3).double()
    arc = ArcFaceHead(dim, C, s=30.0, m=0.3).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(C, dim, dtype=torch.float64))
        arc.weight.copy_(head.weight)
    y = torch.arange(B) % C
    x = head.weight.detach()[y] * 5.0 + 0.01 * torch.randn(B, dim, dtype=torch.float64)
    cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
    cos_y = cos.gather(1, y.view(-1, 1))
    others = cos.masked_fill(F.one_hot(y, C).bool(), -2.0).amax(1, keepdim=True)
    assert (torch.cos(torch.acos(cos_y) + 0.3) > others).all()  # no hard negatives in this batch
    torch.testing.assert_close(head(x, y), arc(x, y))
    torch.testing.assert_close(head(x), 30.0 * cos)


def test_bf16_autocast_zero_norm_and_collinear_are_finite(hh):
    head = CurricularFaceHead(D, C)
    hh.check_bf16(head, *hh.make_batch(head, batch=B, seed=5))  # rows: cos = +1, cos = -1, zero norm
    assert torch.isfinite(head.t).all()


def test_t_buffer_round_trips_through_state_dict():
    head, x, y = make_inputs(6)
    head.train()
    for _ in range(3):
        head(x, y)
    state = head.state_dict()
    assert "t" in state and "weight" in state
    other = CurricularFaceHead(D, C).double()
    other.load_state_dict(state)
    assert other.t.item() == head.t.item() != 0.0


@pytest.mark.parametrize(
    "kwargs, name, allowed",
    [
        ({"momentum": 0.0}, "momentum", "(0, 1]"),
        ({"momentum": 1.5}, "momentum", "(0, 1]"),
        ({"m": -0.1}, "m", "[0, 1.5708]"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        CurricularFaceHead(D, C, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)


def test_config_file_builds_the_head_with_its_defaults(hh):
    head = hh.instantiate("curricularface", in_features=8, num_classes=10)
    assert type(head) is CurricularFaceHead
    for key, value in {"s": 64.0, "m": 0.5, "momentum": 0.01}.items():
        assert getattr(head, key) == value
    x, labels = hh.make_batch(head)
    hh.check_bf16(head, x, labels)
    hh.check_probe_cosine(head, x, labels)
