"""Sub-center ArcFace: reference loops, gradients, k=1 is ArcFace, bf16, state dict, errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from marginlab.errors import ConfigError
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead

B, C, D, K = 6, 5, 4, 3
S, M = 64.0, 0.5


def reference(x, w, y, k):
    """Max over each class's k sub-centre cosines, then ArcFace with its fallback, by loops."""
    out = []
    for i, xi in enumerate(x.tolist()):
        nx = math.sqrt(sum(v * v for v in xi))
        row = []
        for cls in range(C):
            best = -2.0
            for sub in range(k):
                wj = w[cls * k + sub].tolist()
                c = sum(p * q for p, q in zip(xi, wj)) / (nx * math.sqrt(sum(q * q for q in wj)))
                best = max(best, max(-1.0, min(1.0, c)))
            if cls == y[i].item():
                theta = math.acos(best)
                best = math.cos(theta + M) if theta < math.pi - M else best - M * math.sin(M)
            row.append(S * best)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def make_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    head = SubCenterArcFaceHead(D, C, k=K).double()
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    with torch.no_grad():
        x[0] = 2.0 * head.weight[y[0] * K + 1]   # cos = +1 with the second sub-centre of its class
    return head, x, y


def test_weight_has_k_rows_per_class():
    head = SubCenterArcFaceHead(D, C, k=K)
    assert head.weight.shape == (C * K, D) and head.num_classes == C
    assert head(torch.randn(2, D)).shape == (2, C)


def test_matches_reference_loops_including_cos_1():
    head, x, y = make_inputs()
    out = head(x, y)
    ref = reference(x, head.weight.detach(), y, K)
    pooled = (F.normalize(x) @ F.normalize(head.weight.detach()).T).view(B, C, K).amax(2)
    torch.testing.assert_close(head.last_cosine, pooled)  # the probe sees the pooled class cosines
    # row 0 sits at cos = 1, where sin(theta) is floored at 1e-6 (finite gradients): s * 1e-6 slack
    torch.testing.assert_close(out[:1], ref[:1], rtol=0, atol=S * 1e-6)
    torch.testing.assert_close(out[1:], ref[1:], rtol=1e-9, atol=1e-9)


def test_gradcheck_float64():
    head, _, y = make_inputs(2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = head.weight.detach().clone().requires_grad_(True)
    fn = lambda x_, w_: functional_call(head, {"weight": w_}, (x_, y))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-5)


def test_k1_is_arcface():
    head = SubCenterArcFaceHead(D, C, k=1).double()
    arc = ArcFaceHead(D, C).double()
    arc.weight.data.copy_(head.weight.data)
    _, x, y = make_inputs(4)
    torch.testing.assert_close(head(x, y), arc(x, y))
    torch.testing.assert_close(head(x), arc(x))


def test_bf16_autocast_zero_norm_and_collinear_are_finite():
    torch.manual_seed(5)
    head = SubCenterArcFaceHead(D, C, k=K)
    y = torch.randint(0, C, (B,))
    x = torch.randn(B, D)
    with torch.no_grad():
        x[0] = 0.0
        x[1] = 2.0 * head.weight[y[1] * K]
        x[2] = -head.weight[y[2] * K + 2]
    x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, y)
        loss = F.cross_entropy(logits.float(), y)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_state_dict_round_trip():
    head, x, y = make_inputs(6)
    other = SubCenterArcFaceHead(D, C, k=K).double()
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(x, y), head(x, y))
    with pytest.raises(RuntimeError):
        SubCenterArcFaceHead(D, C, k=2).load_state_dict(head.state_dict())


@pytest.mark.parametrize("kwargs, name, allowed", [
    ({"k": 0}, "k", "integer >= 1"),
    ({"k": 1.5}, "k", "integer >= 1"),
    ({"m": -0.5}, "m", "[0, 1.5708]"),
    ({"s": 0.0}, "s", "(0, inf]"),
])
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        SubCenterArcFaceHead(D, C, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)


def test_config_file_builds_the_head_with_its_defaults(hh):
    head = hh.instantiate("subcenter_arcface", in_features=8, num_classes=10)
    assert type(head) is SubCenterArcFaceHead
    for key, value in {'s': 64.0, 'm': 0.5, 'k': 3, 'easy_margin': False}.items():
        assert getattr(head, key) == value
    x, labels = hh.make_batch(head)
    hh.check_bf16(head, x, labels)
