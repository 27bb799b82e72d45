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


def reference(x, w, y, k, fallback=True):
    """Max over each class's k sub-centre cosines, then ArcFace (with its fallback, or without: the
    official code's ``no_fallback``), by loops."""
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
                best = math.cos(theta + M) if theta < math.pi - M or not fallback else best - M * math.sin(M)
            row.append(S * best)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def make_inputs(seed=0, mode="exact"):
    g = torch.Generator().manual_seed(seed)
    head = SubCenterArcFaceHead(D, C, k=K, mode=mode).double()
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    with torch.no_grad():
        x[0] = 2.0 * head.weight[y[0] * K + 1]  # cos = +1 with the second sub-centre of its class
    return head, x, y


def test_weight_has_k_rows_per_class():
    head = SubCenterArcFaceHead(D, C, k=K)
    assert head.weight.shape == (C * K, D) and head.num_classes == C
    assert head(torch.randn(2, D)).shape == (2, C)


@pytest.mark.parametrize("mode", ["exact", "no_fallback"])
def test_matches_reference_loops_including_cos_1(mode):
    head, x, y = make_inputs(mode=mode)
    with torch.no_grad():  # sample 1 past pi - m: its class's sub-centres all equal, x nearly opposite
        w0 = head.weight[y[1] * K].clone()
        head.weight[y[1] * K : y[1] * K + K] = w0
        x[1] = -w0 / w0.norm() + 0.2 * torch.tensor([0.3, -0.5, 0.2, 0.4], dtype=torch.float64)
    out = head(x, y)
    assert F.cosine_similarity(x[1], head.weight[y[1] * K], dim=0) < math.cos(math.pi - M)
    ref = reference(x, head.weight.detach(), y, K, fallback=mode == "exact")
    pooled = (F.normalize(x) @ F.normalize(head.weight.detach()).T).view(B, C, K).amax(2)
    torch.testing.assert_close(head.cosine(x), pooled)  # the probe sees the pooled class cosines
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


@pytest.mark.parametrize("mode", ["no_fallback", "exact"])
def test_k1_is_arcface(mode):
    head = SubCenterArcFaceHead(D, C, k=1, mode=mode).double()
    arc = ArcFaceHead(D, C, mode=mode).double()
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


@pytest.mark.parametrize(
    "kwargs, name, allowed",
    [
        ({"k": 0}, "k", "integer >= 1"),
        ({"k": 1.5}, "k", "integer >= 1"),
        ({"m": -0.5}, "m", "[0, 1.5708]"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        SubCenterArcFaceHead(D, C, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)


def test_config_file_builds_the_head_with_its_defaults(hh):
    head = hh.instantiate("subcenter_arcface", in_features=8, num_classes=10)
    assert type(head) is SubCenterArcFaceHead
    for key, value in {"s": 64.0, "m": 0.5, "k": 3, "easy_margin": False}.items():
        assert getattr(head, key) == value
    x, labels = hh.make_batch(head)
    hh.check_bf16(head, x, labels)


# ---- mode: the official code has no theta + m > pi fallback (insightface subcenter_arcface/train_parall.py) --
@pytest.mark.parametrize("mode", ["no_fallback", "exact"])
def test_mode_past_pi_minus_m(hh, mode):
    """theta_y = 2.9 > pi - m: no_fallback (default, official) gives s cos(theta + m) with the slope of
    arccos-then-cos; exact gives ArcFace's fallback s (cos theta - m sin m) with slope s."""
    head = SubCenterArcFaceHead(D, C, k=K, mode=mode).double().train()
    labels = torch.tensor([1, 3])
    x = torch.stack(
        [
            hh.feature_at_angle(head.weight[y * K], theta, 2.0, seed=y).double()
            for y, theta in zip(labels.tolist(), (2.9, 0.4))
        ]
    )
    # the class's other sub-centres point away from the sample (cos -1), so the first one is the max
    with torch.no_grad():
        for i, y in enumerate(labels.tolist()):
            head.weight[y * K + 1 : y * K + K] = -x[i]
    cos = F.cosine_similarity(x, head.weight.detach()[labels * K], dim=1).requires_grad_(True)
    assert cos[0] < math.cos(math.pi - M) < cos[1]
    if mode == "no_fallback":  # arccos, + m, cos: differentiated as the mxnet symbol is
        expected = S * torch.cos(torch.acos(cos) + M)
    else:
        expected = S * torch.where(cos > math.cos(math.pi - M), torch.cos(torch.acos(cos) + M), cos - M * math.sin(M))
    slope = torch.autograd.grad(expected.sum(), cos)[0]
    target = head(x, labels)[torch.arange(2), labels]
    torch.testing.assert_close(target.detach(), expected.detach(), atol=1e-9, rtol=1e-9)
    cos_head = head.cosine_and_target(x, labels)[1]
    got_slope = torch.autograd.grad(head.target_cosine(cos_head, labels).sum() * S, cos_head)[0]
    torch.testing.assert_close(got_slope, slope, atol=1e-8, rtol=1e-8)


def test_default_mode_is_the_official_one(hh):
    assert SubCenterArcFaceHead(D, C).mode == "no_fallback"
    assert hh.instantiate("subcenter_arcface").mode == "no_fallback"
    with pytest.raises(ConfigError) as err:
        SubCenterArcFaceHead(D, C, mode="fallback")
    assert "mode='fallback'" in str(err.value) and "exact, straight_through, no_fallback" in str(err.value)
