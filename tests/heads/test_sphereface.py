"""SphereFace (A-Softmax) head: normalised weights, psi target, annealing, stability and config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads.sphereface import SphereFaceHead


def psi_reference(theta: float, m: int) -> float:
    k = min(int(math.floor(theta * m / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def sphereface_reference(x, weight, labels, m: int, lam: float):
    """float64: ||x|| cos(theta_j) for every class, the target ||x|| (psi + lambda cos) / (1 + lambda)."""
    x, w = x.double(), weight.double()
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        nx = x[i].norm().item()
        for j in range(w.shape[0]):
            cos = 0.0 if nx == 0 else max(-1.0, min(1.0, (x[i] @ w[j]).item() / (nx * w[j].norm().item())))
            out[i, j] = nx * cos
            if j == int(labels[i]):
                theta = math.acos(cos)
                out[i, j] = nx * (psi_reference(theta, m) + lam * cos) / (1.0 + lam)
    return out


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_training_logits_match_reference(hh, m):
    head = SphereFaceHead(6, 7, m=m)
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.2, 5.0, 7).unsqueeze(1))  # unequal norms: must not matter
    x, labels = hh.make_batch(head, batch=12, seed=m)
    near = [hh.feature_at_angle(head.weight[y], k * math.pi / m + d, 2.0, seed=i)
            for i, (y, k, d) in enumerate(zip(labels.tolist(), range(1, 13), [-1e-3, 0.0, 1e-3] * 4))
            if 0 < k * math.pi / m + d < math.pi]
    if near:
        x = torch.cat([x, torch.stack(near)])
        labels = torch.cat([labels, labels[: len(near)]])
    head.train()
    logits = head(x, labels)
    lam = head.current_lambda().item()
    assert lam == pytest.approx(1000.0 / 1.12, rel=1e-6)
    expected = sphereface_reference(x, head.weight.detach(), labels, m, lam)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=2e-4)


def test_m1_is_modified_softmax(hh):
    head = SphereFaceHead(8, 10, m=1)
    x, labels = hh.make_batch(head)
    expected = F.linear(x, F.normalize(head.weight.detach()))  # ||x|| cos(theta_j)
    head.train()
    torch.testing.assert_close(head(x, labels), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head.eval()(x), expected, atol=1e-5, rtol=1e-5)


def test_weight_scale_does_not_matter(hh):
    head = SphereFaceHead(8, 10)
    x, labels = hh.make_batch(head)
    head.eval()
    before = head(x, labels)
    with torch.no_grad():
        head.weight.mul_(7.0)
    torch.testing.assert_close(head(x, labels), before, atol=1e-4, rtol=1e-5)


def test_default_schedule_reaches_lambda_min():
    head = SphereFaceHead(8, 10)
    head.iteration.fill_(1000)
    assert head.schedule_values()["lambda"] == pytest.approx(1000.0 / (1 + 0.12 * 1000), rel=1e-6)
    head.iteration.fill_(1659)  # 1000 / (1 + 0.12 it) drops below 5 after iteration ~1,658
    assert head.schedule_values()["lambda"] == pytest.approx(5.0)


@pytest.mark.parametrize("m", [2, 4])
def test_gradcheck(hh, m):
    head = SphereFaceHead(5, 6, m=m, base=0.5, gamma=0.0, lambda_min=0.0)
    x, labels = hh.make_batch(head, batch=6, special=False, seed=m)
    hh.gradcheck_head(head, x, labels)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_finite(hh, input_dtype):
    head = SphereFaceHead(8, 10)
    x, labels = hh.make_batch(head, batch=10)
    hh.check_bf16(head, x, labels, input_dtype)


def test_probe_cosine(hh):
    head = SphereFaceHead(8, 10)
    x, labels = hh.make_batch(head)
    hh.check_probe_cosine(head, x, labels)


@pytest.mark.parametrize("kwargs, words", [
    ({"m": 0}, ["m=0", "integer >= 1"]),
    ({"m": 1.5}, ["m=1.5", "integer >= 1"]),
    ({"lambda_min": -1.0}, ["lambda_min=-1.0", "[0, inf]"]),
    ({"gamma": -0.12}, ["gamma=-0.12", "[0, inf]"]),
])
def test_bad_hyperparameters(kwargs, words):
    with pytest.raises(ConfigError) as err:
        SphereFaceHead(8, 10, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_config_defaults(hh):
    head = hh.instantiate("sphereface")
    assert isinstance(head, SphereFaceHead) and head.normalize_weights
    assert (head.m, head.base, head.gamma, head.power, head.lambda_min) == (4, 1000.0, 0.12, 1.0, 5.0)
