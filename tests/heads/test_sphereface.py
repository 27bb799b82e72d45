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
    near = [
        hh.feature_at_angle(head.weight[y], k * math.pi / m + d, 2.0, seed=i)
        for i, (y, k, d) in enumerate(zip(labels.tolist(), range(1, 13), [-1e-3, 0.0, 1e-3] * 4))
        if 0 < k * math.pi / m + d < math.pi
    ]
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


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"m": 1.5}, ["m=1.5", "integer >= 1"]),
        ({"lambda_min": -1.0}, ["lambda_min=-1.0", "[0, inf]"]),
        ({"gamma": -0.12}, ["gamma=-0.12", "[0, inf]"]),
    ],
)
def test_bad_hyperparameters(kwargs, words):
    with pytest.raises(ConfigError) as err:
        SphereFaceHead(8, 10, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_config_defaults(hh):
    head = hh.instantiate("sphereface")
    assert isinstance(head, SphereFaceHead) and head.normalize_weights
    assert (head.m, head.base, head.gamma, head.power, head.lambda_min) == (4, 1000.0, 0.12, 1.0, 5.0)


# ---- mode="official": the Caffe layer (wy1iu/sphereface margin_inner_product_layer.cpp) ---------------------
def caffe_margin_inner_product(x, weight, labels, m: int, lam: float, top_diff):
    """float64 emulation of the Caffe layer's Forward_cpu / Backward_cpu, line by line from the source
    (tools/caffe-sphereface/src/caffe/layers/margin_inner_product_layer.cpp): returns (top, the weight
    after the in-place renormalisation, bottom_diff, weight_diff)."""
    sign = torch.sign  # caffe_cpu_sign: (0 < x) - (x < 0)
    w = weight.double().clone()
    w = w / torch.sqrt((w * w).sum(dim=1, keepdim=True))  # normalize weight, in place in Caffe
    x = x.double()
    M, N = x.shape[0], w.shape[0]
    x_norm = torch.sqrt((x * x).sum(dim=1))
    cos = (x @ w.t()) / x_norm.unsqueeze(1)
    s0 = sign(cos)
    c2, c3, c4 = cos**2, cos**3, cos**4
    if m == 3:
        s1 = sign(cos.abs() - 0.5)
        s2 = s0 * (1.0 + s1) - 2.0
    if m == 4:
        s3 = s0 * sign(2.0 * c2 - 1.0)
        s4 = 2.0 * s0 + s3 - 3.0
    top = x @ w.t()
    if m > 1:
        for i in range(M):
            j = int(labels[i])
            if m == 2:
                top[i, j] = x_norm[i] * (2.0 * s0[i, j] * c2[i, j] - 1.0)
            elif m == 3:
                top[i, j] = x_norm[i] * (s1[i, j] * (4.0 * c3[i, j] - 3.0 * cos[i, j]) + s2[i, j])
            else:
                top[i, j] = x_norm[i] * (s3[i, j] * (8.0 * c4[i, j] - 8.0 * c2[i, j] + 1.0) + s4[i, j])
        top = (top + lam * (x @ w.t())) / (1.0 + lam)
    g = top_diff.double()
    weight_diff = g.t() @ x
    if m == 1:
        return top, w, g @ w, weight_diff
    bottom_diff = torch.zeros_like(x)
    for i in range(M):
        y = int(labels[i])
        for j in range(N):
            if j != y:
                bottom_diff[i] += g[i, j] / (1.0 + lam) * w[j]
                continue
            if m == 2:
                cw = 4.0 * s0[i, j] * cos[i, j]
                cx = 1.0 / (-x_norm[i]) * (2.0 * s0[i, j] * c2[i, j] + 1.0)
            elif m == 3:
                cw = s1[i, j] * (12.0 * c2[i, j] - 3.0)
                cx = 1.0 / (-x_norm[i]) * (8.0 * s1[i, j] * c3[i, j] - s2[i, j])
            else:
                cw = s3[i, j] * (32.0 * c3[i, j] - 16.0 * cos[i, j])
                cx = 1.0 / (-x_norm[i]) * (s3[i, j] * (24.0 * c4[i, j] - 8.0 * c2[i, j] - 1.0) - s4[i, j])
            norm = torch.sqrt(cw * cw + cx * cx)
            cw, cx = cw / norm, cx / norm
            bottom_diff[i] += g[i, j] / (1.0 + lam) * cw * w[j]
            bottom_diff[i] += g[i, j] / (1.0 + lam) * cx * x[i]
    bottom_diff += lam / (1.0 + lam) * (g @ w)  # + lambda / (1 + lambda) * w, every entry
    return top, w, bottom_diff, weight_diff


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("lam", [0.0, 0.7, 5.0])
def test_official_mode_matches_the_caffe_layer(hh, m, lam):
    """Forward, the in-place renormalised W, the x-gradient (psi pair rescaled) and dW = G^T x against
    the float64 emulation of margin_inner_product_layer.cpp, with features near the segment edges."""
    torch.manual_seed(m)
    head = SphereFaceHead(6, 7, m=m, base=lam, gamma=0.0, lambda_min=0.0, mode="official").double().train()
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.2, 5.0, 7, dtype=torch.float64).unsqueeze(1))  # renormalised anyway
    weight0 = head.weight.detach().clone()
    x, labels = hh.make_batch(head, batch=10, seed=m, special=False)
    near = [
        hh.feature_at_angle(weight0[y], k * math.pi / m + 0.05, 2.0, seed=k)
        for k, y in enumerate(labels.tolist()[:m])
        if k * math.pi / m + 0.05 < math.pi
    ]
    x = torch.cat([x, torch.stack(near)]).double().requires_grad_(True)
    labels = torch.cat([labels, labels[: len(near)]])
    top_diff = torch.randn(x.shape[0], 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    logits = head(x, labels)
    (logits * top_diff).sum().backward()
    lam32 = float(torch.tensor(lam, dtype=torch.float32))  # lambda is a float (Dtype) in Caffe, as here
    top, w_unit, bottom_diff, weight_diff = caffe_margin_inner_product(x.detach(), weight0, labels, m, lam32, top_diff)
    torch.testing.assert_close(head.weight.detach(), w_unit, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logits.detach(), top, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(x.grad, bottom_diff, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(head.weight.grad, weight_diff, atol=1e-10, rtol=1e-10)


def test_official_mode_differs_from_exact_only_in_gradients(hh):
    exact = SphereFaceHead(8, 10, base=0.0, gamma=0.0, lambda_min=0.0).double().train()
    official = hh.copy_weights(
        exact, SphereFaceHead(8, 10, base=0.0, gamma=0.0, lambda_min=0.0, mode="official").double().train()
    )
    x, labels = hh.make_batch(exact, special=False)
    grads = []
    for head in (exact, official):
        xx = x.double().requires_grad_(True)
        out = head(xx, labels)
        F.cross_entropy(out, labels).backward()
        grads.append((out.detach(), xx.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_official_mode_anneals_lambda_as_the_caffe_layer():
    """iter_ += 1, then lambda = max(lambda_min, base (1 + gamma iter)^-power), once per training forward."""
    head = SphereFaceHead(4, 5, mode="official").train()
    x, labels = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for it in range(1, 4):
        head(x, labels)
        assert head.schedule_values()["lambda"] == pytest.approx(max(5.0, 1000.0 / (1 + 0.12 * it)), rel=1e-6)
    head.eval()(x, labels)  # evaluation forwards do not advance it
    assert int(head.iteration) == 3


def test_official_mode_zero_feature_is_finite():
    head = SphereFaceHead(4, 5, mode="official").train()
    x = torch.randn(3, 4)
    x[1] = 0.0
    x.requires_grad_(True)
    labels = torch.tensor([0, 1, 2])
    F.cross_entropy(head(x, labels), labels).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"mode": "caffe"}, ["mode='caffe'", "exact, official"]),
        ({"mode": "official", "m": 5}, ["m=5", "mode='official'", "1, 2, 3, 4"]),
    ],
)
def test_bad_mode(kwargs, words):
    with pytest.raises(ConfigError) as err:
        SphereFaceHead(8, 10, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_casia_experiment_uses_the_official_mode():
    from pathlib import Path

    from omegaconf import OmegaConf

    import marginlab

    exp = OmegaConf.load(Path(marginlab.__file__).parent / "configs" / "experiment" / "sphereface_casia.yaml")
    assert exp.head.mode == "official"
