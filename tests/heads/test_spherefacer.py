"""SphereFace-R (heads/spherefacer.py) against a float64 port of the official opensphere code: H (v0, v1, v2), N and S
(loss, dx, dW, the margin schedule and its saved counter); gradcheck where the official gradient is exact; refusals;
resume through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from marginlab.config.validate import resolve_head
from marginlab.errors import ConfigError
from marginlab.heads import SphereFaceR, SphereFaceRHead
from marginlab.training.margin_feasibility import advise

from .conftest import HEAD_CONFIGS
from .test_sphereface2 import check_autocast, check_cli_resume, check_no_chunked_nor_partial_fc


@torch.no_grad()
def get_d_theta(cos_theta, y, magn_type, m):
    """opensphere model/head/spherefacer.py at 032c31b8918fb7639d3b34ac7433bfd537c6c518, line for line."""
    m_theta = torch.acos(cos_theta.clamp(-1.0 + 1e-5, 1.0 - 1e-5))
    m_theta.scatter_(1, y.view(-1, 1), m, reduce="multiply")
    if magn_type == "v0":
        k = (m_theta / math.pi).floor()
        sign = -2 * torch.remainder(k, 2) + 1
        phi_theta = sign * torch.cos(m_theta) - 2.0 * k
        d_theta = phi_theta - cos_theta
    elif magn_type == "v1":
        m_theta.clamp_(1e-5, 3.14159)
        phi_theta = torch.cos(m_theta)
        d_theta = phi_theta - cos_theta
    else:
        eta_theta = torch.cos(m_theta / m)
        d_theta = eta_theta - cos_theta
    return d_theta


class Official(torch.nn.Module):
    """SphereFaceR_H / _N / _S of the same file in one module (the D x C kernel ``w``); N's constructor calls
    ``super(SphereFace_N, self)``, a NameError in the official code: here it is the evident intent."""

    def __init__(self, kind, feat_dim, num_class, magn_type, s=30.0, m=1.5, dm=1.5, steps=(), t=0.01, lw=50.0):
        super().__init__()
        self.kind, self.magn_type, self.s, self.m, self.dm, self.steps, self.t, self.lw = (
            kind, magn_type, s, m, dm, list(steps), t, lw,
        )  # fmt: skip
        self.iter = 0
        self.w = torch.nn.Parameter(torch.Tensor(feat_dim, num_class))
        torch.nn.init.xavier_normal_(self.w)

    def forward(self, x, y):
        if self.kind != "H":
            self.iter += 1
            n_step = len([step for step in self.steps if step < self.iter])
            m = 1.0 + self.dm * n_step
        else:
            m = self.m
        with torch.no_grad():
            self.w.data = F.normalize(self.w.data, 2, 0)
        magnitude = torch.norm(x, p=2, dim=1, keepdim=True)
        cos_theta = x.mm(self.w) / magnitude
        d_theta = get_d_theta(cos_theta, y, self.magn_type, m)
        if self.kind == "H":
            logits = self.s * (cos_theta + d_theta)
            return self.lw * F.cross_entropy(logits, y) / self.s
        logits = magnitude * (cos_theta + d_theta)
        if self.kind == "N":
            return self.lw * F.cross_entropy(logits, y)
        loss = self.lw * F.cross_entropy(logits, y) / self.s
        return loss + (self.t * torch.abs(magnitude - self.s)).mean()


D, C, B = 7, 11, 9
CASES = [
    ("H", "v0", {"m": 1.5}),
    ("H", "v0", {"m": 4.0}),
    ("H", "v1", {"m": 2.5}),
    ("H", "v2", {"s": 60.0, "m": 1.4}),
    ("N", "v0", {"dm": 0.1, "steps": [1, 2], "lw": 1.0}),
    ("S", "v2", {"dm": 1.5, "steps": [2], "t": 0.01}),
    ("S", "v1", {"dm": 0.7, "steps": [0, 1, 2], "t": 0.1}),
]


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64) * 3, torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize("variant, version, kwargs", CASES)
def test_matches_the_official_code_in_float64(variant, version, kwargs):
    torch.manual_seed(0)
    official = Official(variant, D, C, version, **kwargs).double()
    head = SphereFaceRHead(D, C, variant=variant, version=version, **kwargs).double()
    with torch.no_grad():
        head.weight.copy_(official.w.T)
    x, y = batch()
    for step in range(4):  # N and S raise m at their steps
        xo, xh = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        official.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        expected = official(xo, y)
        out = head(xh, y)
        expected.backward()
        out.loss.backward()
        torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=1e-12, msg=f"step {step}")
        torch.testing.assert_close(xh.grad, xo.grad, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(head.weight.grad, official.w.grad.T, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(head.weight.detach(), official.w.detach().T, atol=1e-12, rtol=0)
        assert torch.equal(out.predicted, (F.normalize(x) @ head.weight.detach().T).argmax(1))
        if variant != "H":
            assert int(head.iteration) == official.iter
            assert head.schedule_values() == {"m": 1.0 + kwargs["dm"] * sum(s < official.iter for s in kwargs["steps"])}
        with torch.no_grad():
            for p in (head.weight, official.w):
                p -= 0.5 * p.grad


def test_the_counter_is_saved_and_a_loaded_head_raises_m_at_the_same_step():
    torch.manual_seed(0)
    head = SphereFaceRHead(D, C, variant="S", steps=[2, 3], dm=0.5)
    x, y = batch()
    for _ in range(2):
        head(x.float(), y)
    assert set(head.state_dict()) == {"weight", "iteration"} and int(head.state_dict()["iteration"]) == 2
    copy = SphereFaceRHead(D, C, variant="S", steps=[2, 3], dm=0.5)
    copy.load_state_dict(head.state_dict())
    assert copy.current_m() == head.current_m() == 1.0
    torch.testing.assert_close(copy(x.float(), y).loss, head(x.float(), y).loss, atol=0, rtol=0)
    assert copy.current_m() == head.current_m() == 1.5  # iteration 3: one step (2) below it
    assert "iteration" not in SphereFaceRHead(D, C).state_dict()  # H has no schedule


@pytest.mark.parametrize("variant, version", [("H", "v1"), ("N", "v0"), ("S", "v2")])
def test_gradcheck_where_the_official_gradient_is_exact(variant, version):
    """d_theta is a constant of the official gradient (no_grad): the loss's derivative where it does not depend on
    cos, m = 1 (no margin; v0 / v1 / v2 all leave cos theta); mode=exact."""
    torch.manual_seed(0)
    head = SphereFaceRHead(D, C, variant=variant, version=version, m=1.0, dm=0.0, mode="exact").double().eval()
    x, y = batch()
    x = x.requires_grad_(True)
    w = head.weight.detach().clone().requires_grad_(True)

    def fn(x_, w_):
        return torch.func.functional_call(head, {"weight": w_}, (x_, y)).loss

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant, version", [("H", "v0"), ("H", "v2"), ("N", "v1"), ("S", "v2")])
def test_bfloat16_autocast_gives_a_finite_float32_loss_and_gradients(variant, version, hh):
    check_autocast(SphereFaceRHead(D, C, variant=variant, version=version, steps=[0]), hh)


def test_evaluation_logits_are_margin_free():
    torch.manual_seed(0)
    x, _ = batch()
    for variant in ("H", "S"):
        head = SphereFaceRHead(D, C, variant=variant, s=20.0).double()
        cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
        scale = 20.0 if variant == "H" else x.norm(dim=1, keepdim=True)
        torch.testing.assert_close(head(x), scale * cos, atol=1e-12, rtol=0)


def test_the_exports_and_the_config_defaults():
    assert SphereFaceR is SphereFaceRHead
    spec = resolve_head(OmegaConf.load(HEAD_CONFIGS / "spherefacer.yaml"))
    assert spec.cls is SphereFaceRHead
    # opensphere config/train/vggface2_sfnet20_spherefacer.yml: SphereFaceR_H, s 60, m 1.4, magn_type v2, lw 50
    assert {k: spec.kwargs[k] for k in ("variant", "version", "s", "m", "lw")} == {
        "variant": "H",
        "version": "v2",
        "s": 60.0,
        "m": 1.4,
        "lw": 50.0,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "X"}, "variant='X' is not allowed: it must be one of H, N, S"),
        ({"version": "v3"}, "version='v3' is not allowed: it must be one of v0, v1, v2"),
        ({"mode": "fast"}, "mode='fast' is not allowed: it must be one of official, exact"),
        ({"m": 0.9}, "m=0.9 is not allowed: it must lie in [1, inf]"),
        ({"s": 0.0}, "s=0.0 is not allowed: it must lie in (0, inf]"),
        ({"dm": -1.0}, "dm=-1.0 is not allowed: it must lie in [0, inf]"),
        ({"steps": [10, -1]}, "steps=[10, -1] is not allowed: it must be a list of integers >= 0"),
        ({"t": -0.1}, "t=-0.1 is not allowed: it must lie in [0, inf]"),
        ({"lw": 0.0}, "lw=0.0 is not allowed: it must lie in (0, inf]"),
    ],
)
def test_bad_hyperparameters_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SphereFaceRHead(D, C, **kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_chunked_and_partial_fc_are_refused_in_one_line():
    check_no_chunked_nor_partial_fc("spherefacer", "SphereFaceRHead")


def test_the_margin_advisor_on_ten_classes_in_2d():
    """m theta_y < theta_j (every version): 10 classes in 2-D leave 36 / (m + 1) deg, tight below 4.5 deg; N and S
    start with m = 1 (no margin, no verdict) and grow it."""
    assert advise(SphereFaceRHead(2, 10, m=1.4)).verdict == "ok"
    assert advise(SphereFaceRHead(2, 10, m=8.0)).verdict == "tight"
    assert advise(SphereFaceRHead(2, 10, variant="N", steps=[5])) is None


def test_training_and_resume_through_the_cli_are_bit_exact(run_train, metrics, tmp_path, monkeypatch):
    check_cli_resume(run_train, metrics, tmp_path, monkeypatch, "head=spherefacer", "head.lw=5")
