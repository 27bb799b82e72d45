"""L-Softmax head: psi, the annealed target logit, the iteration buffer, stability and config."""

from __future__ import annotations

import math

import pytest
import torch

from marginlab.errors import ConfigError
from marginlab.heads.lsoftmax import LSoftmaxHead, multiple_angle_cos, psi
from marginlab.heads.softmax import SoftmaxHead


def psi_reference(c: float, m: int) -> float:
    """psi via the angle itself: theta = acos(c), k = floor(m theta / pi) (the last segment closed)."""
    theta = math.acos(max(-1.0, min(1.0, c)))
    k = min(int(math.floor(theta * m / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def lsoftmax_reference(x, weight, labels, m: int, lam: float, normalize_weights: bool = False):
    """float64 training logits, one sample at a time."""
    x, w = x.double(), weight.double()
    if normalize_weights:
        w = w / w.norm(dim=1, keepdim=True)
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            out[i, j] = float(x[i] @ w[j])
        y = int(labels[i])
        nx, nw = float(x[i].norm()), float(w[y].norm())
        if nx == 0.0:
            out[i, y] = 0.0
            continue
        c = float(x[i] @ w[y]) / (nx * nw)
        out[i, y] = (lam * nx * nw * c + nx * nw * psi_reference(c, m)) / (1.0 + lam)
    return out


def boundary_batch(head, hh, labels):
    """Features placed just before, at and just after each segment boundary k pi / m."""
    feats = []
    for i, y in enumerate(labels.tolist()):
        k = 1 + i % max(head.m - 1, 1) if head.m > 1 else 0
        theta = k * math.pi / head.m + (-1e-3, 0.0, 1e-3)[i % 3]
        feats.append(hh.feature_at_angle(head.weight[y], min(max(theta, 0.0), math.pi), 1.5, seed=i))
    return torch.stack(feats)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_matches_the_angle_formula(m):
    g = torch.Generator().manual_seed(m)
    thresholds = [math.cos(j * math.pi / m) for j in range(m + 1)]
    near = [t + d for t in thresholds for d in (-1e-9, 0.0, 1e-9, -1e-4, 1e-4)]
    cos = torch.cat(
        [
            torch.rand(200, generator=g, dtype=torch.float64) * 2 - 1,
            torch.tensor([-1.0, 1.0] + near, dtype=torch.float64),
        ]
    ).clamp(-1.0, 1.0)
    expected = torch.tensor([psi_reference(c, m) for c in cos.tolist()], dtype=torch.float64)
    torch.testing.assert_close(psi(cos, m), expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(multiple_angle_cos(cos, m), torch.cos(m * torch.acos(cos)), atol=1e-9, rtol=0)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_psi_is_continuous_and_decreasing_on_0_pi(m):
    theta = torch.linspace(0.0, math.pi, 200_001, dtype=torch.float64)
    values = psi(torch.cos(theta), m)
    steps = values.diff()
    assert (steps <= 1e-12).all(), "psi must not increase"
    # |d psi / d theta| = m |sin(m theta)| <= m, so no step may exceed m * dtheta (no jumps)
    assert steps.abs().max() <= m * (math.pi / 200_000) * (1 + 1e-6)
    assert values[0].item() == pytest.approx(1.0)
    assert values[-1].item() == pytest.approx(1.0 - 2.0 * m)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_training_logits_match_reference(hh, m):
    head = LSoftmaxHead(6, 7, m=m, base=3.0, gamma=0.5, power=1.0, lambda_min=0.0)
    x, labels = hh.make_batch(head, batch=12, seed=m)
    x_edge = boundary_batch(head, hh, labels)
    x = torch.cat([x, x_edge])
    labels = torch.cat([labels, labels])
    head.train()
    logits = head(x, labels)
    lam = head.current_lambda().item()
    assert lam == pytest.approx(3.0 / 1.5)  # one training forward: 3 (1 + 0.5 * 1)^-1
    expected = lsoftmax_reference(x, head.weight.detach(), labels, m, lam)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=2e-4)


def test_m1_equals_softmax_without_bias(hh):
    head = LSoftmaxHead(8, 10, m=1, base=10.0, gamma=0.1, power=2.0)
    ref = hh.copy_weights(head, SoftmaxHead(8, 10, bias=False))
    x, labels = hh.make_batch(head, batch=16)
    head.train()
    for _ in range(3):  # whatever lambda is, psi = cos makes the blend W x
        torch.testing.assert_close(head(x, labels), ref(x, labels), atol=1e-5, rtol=1e-5)


def test_eval_logits_are_wx(hh):
    head = LSoftmaxHead(8, 10)
    x, labels = hh.make_batch(head)
    head.eval()
    torch.testing.assert_close(head(x), x @ head.weight.detach().T, atol=1e-5, rtol=1e-5)
    assert head.iteration.item() == 0


@pytest.mark.parametrize("m", [2, 3, 4])
def test_gradcheck(hh, m):
    head = LSoftmaxHead(5, 6, m=m, base=0.7, gamma=0.0, lambda_min=0.0)
    x, labels = hh.make_batch(head, batch=6, special=False, seed=m)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_forward_leaves_the_embeddings_untouched(hh, dtype):
    """The precise target W_y . x multiplies a widened copy of x in place, never x itself (in float64
    widening is a no-op)."""
    head = LSoftmaxHead(8, 10, m=3).to(dtype).train()
    x, labels = hh.make_batch(head)
    x = x.to(dtype)
    before = x.clone()
    head(x, labels)
    assert torch.equal(x, before)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, input_dtype):
    head = LSoftmaxHead(8, 10, m=4)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_iteration_buffer_schedule_and_resume(hh):
    head = LSoftmaxHead(8, 10, m=2, base=1000.0, gamma=2e-2, power=3.0, lambda_min=0.5)
    x, labels = hh.make_batch(head)
    assert head.schedule_values()["lambda"] == pytest.approx(1000.0)
    head.train()
    for _ in range(5):
        head(x, labels)
    head(x)  # no labels: no step
    head.eval()
    head(x, labels)  # eval: no step
    assert head.iteration.item() == 5
    assert head.schedule_values()["lambda"] == pytest.approx(max(0.5, 1000.0 * (1 + 2e-2 * 5) ** -3.0), rel=1e-5)
    assert "iteration" in head.state_dict()
    resumed = LSoftmaxHead(8, 10, m=2, base=1000.0, gamma=2e-2, power=3.0, lambda_min=0.5)
    resumed.load_state_dict(head.state_dict())
    resumed.train()
    resumed(x, labels)
    assert resumed.iteration.item() == 6
    # far along the schedule lambda sits at lambda_min
    resumed.iteration.fill_(10**6)
    assert resumed.schedule_values()["lambda"] == pytest.approx(0.5)


def test_no_acos_in_the_forward_or_backward(hh, monkeypatch):
    head = LSoftmaxHead(8, 10, m=4)
    x, labels = hh.make_batch(head)
    x.requires_grad_(True)

    def forbidden(*args, **kwargs):
        raise AssertionError("acos called")

    monkeypatch.setattr(torch, "acos", forbidden)
    head.train()
    head(x, labels).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_margin_violation_is_angular():
    head = LSoftmaxHead(4, 3, m=3)
    theta_y = torch.tensor([0.2, 0.2])
    theta_o = torch.tensor([0.7, 0.5])  # 3 * 0.2 = 0.6: beats 0.7, fails 0.5
    assert head.probe_margin.violation(torch.cos(theta_y), torch.cos(theta_o)).tolist() == [False, True]


def test_probe_cosine(hh):
    head = LSoftmaxHead(8, 10)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"m": 2.5}, ["m=2.5", "integer >= 1"]),
        ({"base": -1.0}, ["base=-1.0", "[0, inf]"]),
        ({"gamma": -1e-3}, ["gamma=", "[0, inf]"]),
        ({"power": -2.0}, ["power=-2.0", "[0, inf]"]),
        ({"lambda_min": -5.0}, ["lambda_min=-5.0", "[0, inf]"]),
    ],
)
def test_bad_hyperparameters(kwargs, words):
    with pytest.raises(ConfigError) as err:
        LSoftmaxHead(8, 10, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_config_defaults(hh):
    head = hh.instantiate("lsoftmax", in_features=8, num_classes=10)
    assert isinstance(head, LSoftmaxHead) and not head.normalize_weights
    assert (head.m, head.base, head.gamma, head.power, head.lambda_min) == (4, 1000.0, 2.5e-5, 35.0, 0.0)
    assert head.weight.shape == (10, 8)
