"""SphereFace2 (heads/sphereface2.py) against a float64 port of the official opensphere code: loss, dx, dW, db, the
closed-form b, W renormalised in place; gradcheck where the official gradient is the exact one; refusals; resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from marginlab.config.validate import resolve_head
from marginlab.errors import ConfigError
from marginlab.heads import SphereFace2, SphereFace2Head
from marginlab.heads.output import HeadLoss
from marginlab.heads.sphereface2 import initial_bias
from marginlab.training.margin_feasibility import advise
from tests.conftest import train_straight_and_resumed
from tests.test_resume import assert_same_run

from .conftest import HEAD_CONFIGS


class OfficialSphereFace2(torch.nn.Module):
    """ydwen/opensphere model/head/sphereface2.py at 032c31b8918fb7639d3b34ac7433bfd537c6c518, line for line
    (the D x C kernel ``w``; ``magn_type``)."""

    def __init__(self, feat_dim, num_class, magn_type="C", alpha=0.7, r=40.0, m=0.4, t=3.0, lw=50.0):
        super().__init__()
        self.num_class, self.magn_type = num_class, magn_type
        self.alpha, self.r, self.m, self.t, self.lw = alpha, r, m, t, lw
        self.w = torch.nn.Parameter(torch.Tensor(feat_dim, num_class))
        torch.nn.init.xavier_normal_(self.w)
        z = alpha / ((1.0 - alpha) * (num_class - 1.0))
        if magn_type == "C":
            ay = r * (2.0 * 0.5**t - 1.0 - m)
            ai = r * (2.0 * 0.5**t - 1.0 + m)
        elif magn_type == "A":
            theta_y = min(math.pi, math.pi / 2.0 + m)
            ay = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0)
            ai = r * (2.0 * 0.5**t - 1.0)
        else:
            theta_y = min(math.pi, m * math.pi / 2.0)
            ay = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0)
            ai = r * (2.0 * 0.5**t - 1.0)
        temp = (1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)
        b = math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt(temp))
        self.b = torch.nn.Parameter(torch.Tensor(1))
        torch.nn.init.constant_(self.b, b)

    def forward(self, x, y):
        with torch.no_grad():
            self.w.data = F.normalize(self.w.data, dim=0)
        cos_theta = F.normalize(x, dim=1).mm(self.w)
        one_hot = torch.zeros_like(cos_theta)
        one_hot.scatter_(1, y.view(-1, 1), 1.0)
        with torch.no_grad():
            if self.magn_type == "C":
                g_cos_theta = 2.0 * ((cos_theta + 1.0) / 2.0).pow(self.t) - 1.0
                g_cos_theta = g_cos_theta - self.m * (2.0 * one_hot - 1.0)
            elif self.magn_type == "A":
                theta_m = torch.acos(cos_theta.clamp(-1 + 1e-5, 1.0 - 1e-5))
                theta_m.scatter_(1, y.view(-1, 1), self.m, reduce="add")
                theta_m.clamp_(1e-5, 3.14159)
                g_cos_theta = torch.cos(theta_m)
                g_cos_theta = 2.0 * ((g_cos_theta + 1.0) / 2.0).pow(self.t) - 1.0
            else:
                m_theta = torch.acos(cos_theta.clamp(-1 + 1e-5, 1.0 - 1e-5))
                m_theta.scatter_(1, y.view(-1, 1), self.m, reduce="multiply")
                m_theta.clamp_(1e-5, 3.14159)
                g_cos_theta = torch.cos(m_theta)
                g_cos_theta = 2.0 * ((g_cos_theta + 1.0) / 2.0).pow(self.t) - 1.0
            d_theta = g_cos_theta - cos_theta
        logits = self.r * (cos_theta + d_theta) + self.b
        weight = self.alpha * one_hot + (1.0 - self.alpha) * (1.0 - one_hot)
        weight = self.lw * self.num_class / self.r * weight
        return F.binary_cross_entropy_with_logits(logits, one_hot, weight=weight)


D, C, B = 7, 11, 9
CASES = [("C", 0.4, 3.0), ("C", 0.35, 1.0), ("A", 0.5, 3.0), ("A", 0.3, 2.0), ("M", 1.7, 3.0), ("M", 2.5, 1.0)]


def pair(variant, m, t, alpha=0.7, r=40.0, lw=10.0, seed=0):
    """The official module (float64, its own draw) and our head with its W (transposed) and b."""
    torch.manual_seed(seed)
    official = OfficialSphereFace2(D, C, variant, alpha=alpha, r=r, m=m, t=t, lw=lw).double()
    head = SphereFace2Head(D, C, variant=variant, alpha=alpha, r=r, m=m, t=t, lw=lw).double()
    with torch.no_grad():
        head.weight.copy_(official.w.T)
    return official, head


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64) * 3, torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("variant, m, t", CASES)
def test_matches_the_official_code_in_float64(variant, m, t):
    official, head = pair(variant, m, t)
    assert head.b.item() == official.b.item()  # the closed-form initial b, the same float
    x, y = batch()
    for _ in range(2):  # a second step: from the renormalised W of the first
        xo, xh = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        official.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        expected = official(xo, y)
        out = head(xh, y)
        assert isinstance(out, HeadLoss)
        expected.backward()
        out.loss.backward()
        torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(xh.grad, xo.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(head.weight.grad, official.w.grad.T, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(head.b.grad, official.b.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(head.weight.detach(), official.w.detach().T, atol=1e-12, rtol=0)  # renormalised
        assert torch.equal(out.predicted, (F.normalize(x) @ head.weight.detach().T).argmax(1))
        with torch.no_grad():
            for p in (head.weight, head.b, official.w, official.b):  # an SGD step on both
                p -= 0.5 * p.grad


def test_official_mode_renormalises_w_in_place_only_in_training_and_exact_never():
    torch.manual_seed(0)
    head = SphereFace2Head(D, C)
    start = head.weight.detach().clone()
    x, y = batch()
    head.eval()(x.float(), y)
    assert torch.equal(head.weight.detach(), start)  # evaluation never moves W
    head.train()(x.float(), y)
    torch.testing.assert_close(head.weight.detach(), F.normalize(start), atol=1e-7, rtol=0)
    exact = SphereFace2Head(D, C, mode="exact")
    kept = exact.weight.detach().clone()
    exact.train()(x.float(), y)
    assert torch.equal(exact.weight.detach(), kept)


@pytest.mark.parametrize("variant, m", [("C", 0.3), ("A", 0.0), ("M", 1.0)])
def test_gradcheck_where_the_official_gradient_is_exact(variant, m):
    """The official gradient treats g and the margin as constants (d_theta under no_grad): it is the loss's
    derivative where d_theta does not depend on cos, t = 1 and an additive (or no) margin; mode=exact."""
    torch.manual_seed(0)
    head = SphereFace2Head(D, C, variant=variant, m=m, t=1.0, mode="exact").double()
    x, y = batch()
    x = x.requires_grad_(True)
    w = head.weight.detach().clone().requires_grad_(True)
    b = head.b.detach().clone().requires_grad_(True)

    def fn(x_, w_, b_):
        return torch.func.functional_call(head, {"weight": w_, "b": b_}, (x_, y)).loss

    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant, m", [("C", 0.4), ("A", 0.5), ("M", 1.7)])
def test_bfloat16_autocast_gives_a_finite_float32_loss_and_gradients(variant, m, hh):
    check_autocast(SphereFace2Head(D, C, variant=variant, m=m), hh)


def check_autocast(head, hh):
    """Under CPU bfloat16 autocast, with a feature at its class, one opposite and a zero one: a float32 loss, finite,
    close to the float32 loss, and finite gradients."""
    x, y = hh.make_batch(head, batch=B)
    reference = copy.deepcopy(head)(x, y).loss.detach()
    x = x.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, y).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, reference, atol=0.05 * float(reference.abs()), rtol=0)
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


def test_evaluation_logits_are_the_margin_free_binary_logits():
    torch.manual_seed(0)
    head = SphereFace2Head(D, C, t=2.0).double()
    x, _ = batch()
    cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
    expected = 40.0 * (2.0 * ((cos + 1.0) / 2.0) ** 2.0 - 1.0) + head.b.detach()
    torch.testing.assert_close(head(x), expected, atol=1e-12, rtol=0)


def test_the_exports_and_the_config_defaults():
    assert SphereFace2 is SphereFace2Head
    cfg = OmegaConf.load(HEAD_CONFIGS / "sphereface2.yaml")
    head = resolve_head(cfg)
    assert head.cls is SphereFace2Head
    assert {k: head.kwargs[k] for k in ("variant", "alpha", "r", "m", "t", "lw")} == {
        "variant": "C",
        "alpha": 0.7,
        "r": 40.0,
        "m": 0.4,
        "t": 3.0,
        "lw": 10.0,
    }  # opensphere config/train/vggface2_sfnet20_sphereface2.yml


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "B"}, "variant='B' is not allowed: it must be one of C, A, M"),
        ({"alpha": 1.0}, "alpha=1.0 is not allowed: it must lie in (0, 1)"),
        ({"alpha": 0.0}, "alpha=0.0 is not allowed: it must lie in (0, 1)"),
        ({"r": 0.0}, "r=0.0 is not allowed: it must lie in (0, inf]"),
        ({"variant": "M", "m": 0.5}, "m=0.5 is not allowed: it must lie in [1, inf]"),
        ({"m": -0.1}, "m=-0.1 is not allowed: it must lie in [0, inf]"),
        ({"t": 0.0}, "t=0.0 is not allowed: it must lie in (0, inf]"),
        ({"lw": 0.0}, "lw=0.0 is not allowed: it must lie in (0, inf]"),
        ({"mode": "fast"}, "mode='fast' is not allowed: it must be one of official, exact"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SphereFace2Head(D, C, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_bias_init_replaces_the_official_closed_form_and_null_keeps_it():
    official = SphereFace2Head(2, 10).b.item()
    assert official == pytest.approx(initial_bias("C", 0.7, 40.0, 0.4, 3.0, 10))
    assert SphereFace2Head(2, 10, bias_init=None).b.item() == official
    assert SphereFace2Head(2, 10, bias_init=-34.25).b.item() == -34.25
    with pytest.raises(ConfigError, match=r"^bias_init='x' is not allowed: it must be a finite number$"):
        SphereFace2Head(2, 10, bias_init="x")


def test_one_class_is_refused():
    with pytest.raises(ConfigError, match=r"^num_classes=1 is not allowed for SphereFace2: it must be >= 2$"):
        SphereFace2Head(D, 1)


def test_chunked_and_partial_fc_are_refused_in_one_line():
    check_no_chunked_nor_partial_fc("sphereface2", "SphereFace2Head")


def check_no_chunked_nor_partial_fc(config: str, class_name: str) -> None:
    """A loss of its own has no cosine-margin path: head.chunked and head.partial_fc are refused in one line."""
    cfg = OmegaConf.load(HEAD_CONFIGS / f"{config}.yaml")
    cfg.chunked = True
    refusal = f"^chunked=true is not allowed with {class_name}: the chunked cross-entropy is not available for it, as"
    with pytest.raises(ConfigError, match=refusal + " it is a loss of its own") as err:
        resolve_head(cfg)
    assert "\n" not in str(err.value)
    cfg = OmegaConf.load(HEAD_CONFIGS / f"{config}.yaml")
    cfg.partial_fc = {"sample_rate": 0.5}
    with pytest.raises(ConfigError, match=f"^Partial FC cannot shard {class_name}: it is a loss of its own"):
        resolve_head(cfg)


@pytest.mark.parametrize(
    "variant, m, verdict",
    [("C", 0.4, "infeasible"), ("C", 0.03, "ok"), ("A", 0.2, "ok"), ("A", 0.7, "infeasible"), ("M", 1.5, "ok")],
)
def test_the_margin_advisor_on_ten_classes_in_2d(variant, m, verdict):
    """10 classes in 2-D are 36 deg apart: C's 2m is a cosine margin (1 - 2m vs cos 36 deg = 0.809), A's m an
    angle (36 deg = 0.63 rad), M's factor always leaves 36 / (m + 1) deg."""
    advice = advise(SphereFace2Head(2, 10, variant=variant, m=m))
    assert advice is not None and advice.verdict == verdict, advice


def test_b_resumes_through_the_state_dict():
    torch.manual_seed(0)
    head = SphereFace2Head(D, C)
    x, y = batch()
    head(x.float(), y).loss.backward()
    with torch.no_grad():
        head.b -= 0.1 * head.b.grad
    copy = SphereFace2Head(D, C)
    copy.load_state_dict(head.state_dict())
    assert set(head.state_dict()) == {"weight", "b"} and torch.equal(copy.b, head.b)
    torch.testing.assert_close(copy(x.float(), y).loss, head(x.float(), y).loss, atol=0, rtol=0)


def test_training_and_resume_through_the_cli_are_bit_exact(run_train, metrics, tmp_path, monkeypatch):
    check_cli_resume(run_train, metrics, tmp_path, monkeypatch, "head=sphereface2", "head.variant=A", "head.m=0.2")


def check_cli_resume(run_train, metrics, tmp_path, monkeypatch, *head):
    """2 epochs straight == 1 epoch + ``resume=latest``, bit for bit (weights and every logged value but timings),
    and it learns (digits: 10 classes)."""
    run = ("logger=quiet", "trainer.epochs=2", "sched=constant", *head)
    straight, split = train_straight_and_resumed(run_train, tmp_path, monkeypatch, *run)
    rows_a = assert_same_run(straight, split, metrics)
    assert rows_a[-1]["test/acc"] > 0.5, rows_a[-1]
