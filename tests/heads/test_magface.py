"""MagFace: reference loops, extra_loss, gradients, reduction to NormFace, bf16, state dict, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from marginlab.errors import ConfigError
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.normface import NormFaceHead

B, C, D = 6, 5, 4
L_A, U_A, L_M, U_M, LAMBDA_G, S = 10.0, 110.0, 0.45, 0.8, 35.0, 64.0


def reference(x, w, y, easy):
    """Logits and lambda_g * mean g(a) with explicit loops and acos/cos."""
    logits, gs = [], []
    for i, xi in enumerate(x.tolist()):
        a = min(U_A, max(L_A, math.sqrt(sum(v * v for v in xi))))
        margin = L_M + (U_M - L_M) * (a - L_A) / (U_A - L_A)
        gs.append(1.0 / a + a / U_A**2)
        nx = math.sqrt(sum(v * v for v in xi))
        row = []
        for j, wj in enumerate(w.tolist()):
            c = sum(p * q for p, q in zip(xi, wj)) / (nx * math.sqrt(sum(q * q for q in wj)))
            c = max(-1.0, min(1.0, c))
            if j == y[i].item():
                theta = math.acos(c)
                if easy:
                    c = math.cos(theta + margin) if c > 0 else c
                else:
                    c = math.cos(theta + margin) if theta < math.pi - margin else c - margin * math.sin(margin)
            row.append(S * c)
        logits.append(row)
    return torch.tensor(logits, dtype=torch.float64), LAMBDA_G * sum(gs) / len(gs)


def make_inputs(seed=0, easy=True):
    g = torch.Generator().manual_seed(seed)
    head = MagFaceHead(D, C, easy_margin=easy).double()
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    x = (
        x
        * torch.tensor([5.0, 20.0, 40.0, 60.0, 90.0, 150.0], dtype=torch.float64).view(-1, 1)
        / x.norm(dim=1, keepdim=True)
    )
    y = torch.randint(0, C, (B,), generator=g)
    with torch.no_grad():
        x[0] = 5.0 * F.normalize(head.weight[y[0]], dim=0)  # cos = +1, a clipped up to l_a
        x[1] = -20.0 * F.normalize(head.weight[y[1]], dim=0)  # cos = -1
    return head, x, y


@pytest.mark.parametrize("easy", [True, False])
def test_matches_reference_loops_including_cos_pm1(easy):
    head, x, y = make_inputs(0, easy)
    head.train()
    out = head(x, y)
    ref, loss_g = reference(x, head.weight.detach(), y, easy)
    # rows 0-1 sit at cos = +-1, where sin(theta) is floored at 1e-6 (finite gradients): s * 1e-6 slack
    torch.testing.assert_close(out[:2], ref[:2], rtol=0, atol=S * 1e-6)
    torch.testing.assert_close(out[2:], ref[2:], rtol=1e-9, atol=1e-9)
    assert head.extra_loss().item() == pytest.approx(loss_g, rel=1e-12)


def test_extra_loss_only_after_a_training_forward():
    head, x, y = make_inputs(1)
    x.requires_grad_(True)
    assert head.extra_loss() is None
    head.train()
    head(x, y)
    assert head.extra_loss() is not None and head.extra_loss().requires_grad
    head(x)
    assert head.extra_loss() is None
    head.train()
    head(x, y)
    head.eval()
    head(x, y)
    assert head.extra_loss() is None


def test_gradcheck_float64_logits_and_regularizer():
    head, x, y = make_inputs(2)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(B, D, generator=g, dtype=torch.float64) * 30).requires_grad_(True)  # a inside (l_a, u_a)
    w = head.weight.detach().clone().requires_grad_(True)
    head.train()

    def fn(x_, w_):
        logits = functional_call(head, {"weight": w_}, (x_, y))
        return logits, head.extra_loss()

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-5)


def test_zero_margins_is_normface():
    head, x, y = make_inputs(4)
    flat = MagFaceHead(D, C, l_m=0.0, u_m=0.0, lambda_g=0.0).double()
    norm = NormFaceHead(D, C, s=S).double()
    flat.weight.data.copy_(head.weight.data)
    norm.weight.data.copy_(head.weight.data)
    flat.train()
    torch.testing.assert_close(flat(x, y), norm(x, y))
    assert flat.extra_loss().item() == 0.0
    torch.testing.assert_close(head(x), norm(x))


def test_bf16_autocast_zero_norm_and_collinear_are_finite():
    torch.manual_seed(5)
    head = MagFaceHead(D, C)
    y = torch.randint(0, C, (B,))
    x = torch.randn(B, D) * 30
    with torch.no_grad():
        x[0] = 0.0
        x[1] = 20.0 * head.weight[y[1]]
        x[2] = -head.weight[y[2]]
    x.requires_grad_(True)
    head.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, y)
        loss = F.cross_entropy(logits.float(), y) + head.extra_loss()
    assert logits.dtype == torch.float32 and head.extra_loss().dtype == torch.float32
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_state_dict_round_trip():
    head, x, y = make_inputs(6)
    other = MagFaceHead(D, C).double()
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(x, y), head(x, y))


@pytest.mark.parametrize(
    "kwargs, name, allowed",
    [
        ({"l_a": 0.0}, "l_a", "(0, inf]"),
        ({"u_a": 10.0}, "u_a", "(10, inf]"),
        ({"l_m": -0.1}, "l_m", "[0, 1.5708]"),
        ({"u_m": 0.3}, "u_m", "[0.45, 1.5708]"),
        ({"lambda_g": -1.0}, "lambda_g", "[0, inf]"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        MagFaceHead(D, C, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)


def test_config_file_builds_the_head_with_its_defaults(hh):
    head = hh.instantiate("magface", in_features=8, num_classes=10)
    assert type(head) is MagFaceHead
    for key, value in {
        "s": 64.0,
        "l_a": 10.0,
        "u_a": 110.0,
        "l_m": 0.45,
        "u_m": 0.8,
        "lambda_g": 35.0,
        "easy_margin": True,
    }.items():
        assert getattr(head, key) == value
    x, labels = hh.make_batch(head)
    hh.check_bf16(head, x, labels)
    hh.check_probe_cosine(head, x, labels)
