"""SoftTriple head: CE on its logits + tau R (``extra_loss``) equal in float64 to a port of the official code, its CE
to pytorch-metric-learning's SoftTripleLoss (which has no centre term), and both to the paper on a hand-derived
case; training + resume via the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads import SoftTriple
from marginlab.heads.softtriple import SoftTripleHead
from marginlab.losses import MarginLoss
from tests.heads.checks import check_resume_exact, chunked_and_partial_fc_errors, loss_and_grads

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
C, D, K = 6, 8, 3


def official_softtriple(x, fc, target, la, gamma, tau, margin, cN, K):
    """idstcv/SoftTriple (cc1c32d) loss/SoftTriple.py forward, line for line (no cuda); ``fc`` is D x (C K)."""
    gamma = 1.0 / gamma
    weight = torch.zeros(cN * K, cN * K, dtype=torch.bool)
    for i in range(0, cN):
        for j in range(0, K):
            weight[i * K + j, i * K + j + 1 : (i + 1) * K] = 1
    centers = F.normalize(fc, p=2, dim=0)
    simInd = x.matmul(centers)
    simStruc = simInd.reshape(-1, cN, K)
    prob = F.softmax(simStruc * gamma, dim=2)
    simClass = torch.sum(prob * simStruc, dim=2)
    marginM = torch.zeros(simClass.shape, dtype=x.dtype)
    marginM[torch.arange(0, marginM.shape[0]), target] = margin
    lossClassify = F.cross_entropy(la * (simClass - marginM), target)
    if tau > 0 and K > 1:
        simCenter = centers.t().matmul(centers)
        reg = torch.sum(torch.sqrt(2.0 + 1e-5 - 2.0 * simCenter[weight])) / (cN * K * (K - 1.0))
        return lossClassify + tau * reg
    return lossClassify


def batch(seed=0, b=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D, generator=g, dtype=torch.float64), torch.randint(0, C, (b,), generator=g)


def ours(head, x, labels, weight):
    """CE of the head's training logits + its extra_loss, as the criterion adds them."""
    head.train()
    logits = torch.func.functional_call(head, {"weight": weight}, (x, labels))
    extra = head.extra_loss()
    return F.cross_entropy(logits, labels) + (0.0 if extra is None else extra)


@pytest.mark.parametrize("tau, k", [(0.2, K), (0.0, K), (0.2, 1)])
def test_equals_the_official_port_in_float64(tau, k):
    x, labels = batch()
    head = SoftTripleHead(D, C, centers_per_class=k, la=20.0, gamma=0.1, tau=tau, margin=0.01).double()
    fc = head.weight.detach().t().contiguous()  # the official D x (C K) kernel
    got = loss_and_grads(lambda x_, w: ours(head, x_, labels, w), x, head.weight)
    expected = loss_and_grads(
        lambda x_, f: official_softtriple(F.normalize(x_), f, labels, 20.0, 0.1, tau, 0.01, C, k), x, fc
    )
    expected = (expected[0], expected[1], expected[2].t())
    for name, g, e in zip(("loss", "dx", "dW"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12, msg=name)
    assert (head.extra_loss() is None) == (tau == 0.0 or k == 1)


@pytest.mark.parametrize("la, gamma, margin", [(20.0, 0.1, 0.01), (5.0, 0.5, 0.2)])
def test_its_cross_entropy_equals_pytorch_metric_learning_in_float64(la, gamma, margin):
    x, labels = batch(1)
    pml = pml_losses.SoftTripleLoss(C, D, centers_per_class=K, la=la, gamma=gamma, margin=margin).double()
    head = SoftTripleHead(D, C, centers_per_class=K, la=la, gamma=gamma, tau=0.0, margin=margin).double()
    got = loss_and_grads(lambda x_, w: ours(head, x_, labels, w), x, pml.fc.detach().t())
    x_ = x.clone().requires_grad_(True)
    expected = pml(x_, labels)
    dx, dfc = torch.autograd.grad(expected, [x_, pml.fc])
    for name, g, e in zip(("loss", "dx", "dW"), got, (expected, dx, dfc.t())):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12, msg=name)


def test_the_papers_formulas_on_a_hand_derived_case():
    """x = (1, 0); class 0's centres (1, 0), (0, 1), class 1's (-1, 0), (0, -1); gamma 0.1, la 20, delta 0.01, tau 0.2.

    S_0 = (e^10 1 + e^0 0) / (e^10 + 1), S_1 = (e^-10 (-1) + 0) / (e^-10 + 1); R = 2 sqrt(2 + 1e-5) / (C K (K - 1))."""
    head = SoftTripleHead(2, 2, centers_per_class=2, la=20.0, gamma=0.1, tau=0.2, margin=0.01).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -1.0]]))
    s0, s1 = math.exp(10) / (math.exp(10) + 1), -math.exp(-10) / (math.exp(-10) + 1)
    logits = head.train()(torch.tensor([[4.0, 0.0]], dtype=torch.float64), torch.tensor([0]))
    torch.testing.assert_close(logits, torch.tensor([[20 * (s0 - 0.01), 20 * s1]], dtype=torch.float64))
    assert head.extra_loss().item() == pytest.approx(0.2 * 2 * math.sqrt(2 + 1e-5) / (2 * 2 * 1), abs=1e-15)
    torch.testing.assert_close(
        head.cosine(torch.tensor([[4.0, 0.0]], dtype=torch.float64)), logits.new_tensor([[s0, s1]])
    )


def test_gradcheck_float64(hh):
    head = SoftTripleHead(6, 4, centers_per_class=3, la=3.0, gamma=0.5).double()
    x, labels = hh.make_batch(head, batch=7, special=False)
    inputs = (x.double().requires_grad_(True), head.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x_, w: ours(head, x_, labels, w), inputs)


def test_the_criterion_adds_the_centre_term_only_in_training(hh):
    head = SoftTriple(D, C, centers_per_class=K)
    x, labels = hh.make_batch(head, batch=12)  # collinear, opposite and zero features
    loss = MarginLoss(head)(x, labels)
    torch.testing.assert_close(loss, F.cross_entropy(head(x, labels), labels) + head.extra_loss())
    assert torch.isfinite(loss)
    head.eval()
    head(x, labels)
    assert head.extra_loss() is None
    hh.check_bf16(head.train(), x, labels)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"centers_per_class": 0}, "centers_per_class=0 is not allowed"),
        ({"la": 0.0}, "la=0.0 is not allowed: it must lie in (0, inf]"),
        ({"gamma": 0.0}, "gamma=0.0 is not allowed: it must lie in (0, inf]"),
        ({"tau": -1.0}, "tau=-1.0 is not allowed: it must lie in [0, inf]"),
        ({"margin": 2.0}, "margin=2.0 is not allowed: it must lie in [0, 1]"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_key(kwargs, words):
    with pytest.raises(ConfigError) as err:
        SoftTripleHead(D, C, **kwargs)
    assert str(err.value).startswith(words)


def test_config_builds_with_the_official_defaults_and_has_no_margin_to_advise(hh):
    from marginlab.training.margin_feasibility import advise

    head = hh.instantiate("softtriple", in_features=D, num_classes=C)
    assert (head.centers_per_class, head.la, head.gamma, head.tau, head.margin) == (10, 20.0, 0.1, 0.2, 0.01)
    assert head.weight.shape == (C * 10, D) and head.official_init == "kaiming_uniform_fan_out"
    assert head.lr_mult == 100.0  # the official centres' learning rate
    assert advise(head) is None  # its margin is on the relaxed similarity S, not a cosine margin on the angle


def test_chunked_and_partial_fc_are_refused_in_one_line(run_train, capfd):
    err = chunked_and_partial_fc_errors(run_train, capfd, "softtriple")
    assert err[0].startswith(
        "marginlab: error: chunked=true is not allowed with SoftTripleHead: the chunked cross-entropy"
    )
    assert "is not available for it, as its logits are not s cos theta" in err[0]
    assert err[1].startswith("marginlab: error: Partial FC needs a cosine margin head") and "SoftTripleHead" in err[1]


def test_trains_and_resumes_exactly_through_the_cli(run_train, metrics, tmp_path, monkeypatch):
    last = check_resume_exact(run_train, metrics, tmp_path, monkeypatch, "head=softtriple")
    assert last["train/nonfinite_steps"] == 0 and last["test/acc"] > 0.2  # 10 classes: chance is 0.1
