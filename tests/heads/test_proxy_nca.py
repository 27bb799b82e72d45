"""ProxyNCA head: equal in float64 to pytorch-metric-learning's ProxyNCALoss (loss, dx, d proxies) and to the
paper's formula on a hand-derived case; a loss of its own through the criterion; training + resume via the CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads import ProxyNCA
from marginlab.heads.output import HeadLoss
from marginlab.heads.proxy_nca import ProxyNCAHead
from marginlab.losses import MarginLoss
from tests.heads.checks import check_resume_exact, chunked_and_partial_fc_errors
from tests.heads.checks import float64_batch as batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def head_loss(head, x, labels, weight):
    return torch.func.functional_call(head, {"weight": weight}, (x, labels)).loss


@pytest.mark.parametrize("scale", [1.0, 8.0, 32.0])
def test_equals_pytorch_metric_learning_in_float64(scale):
    x, labels = batch()
    pml = pml_losses.ProxyNCALoss(10, 8, softmax_scale=scale).double()
    head = ProxyNCAHead(8, 10, softmax_scale=scale).double()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w = pml.proxies.detach().clone().requires_grad_(True)  # PML's proxies as the head's weight
    expected = pml(x1, labels)
    got = head_loss(head, x2, labels, w)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for g, e in zip(torch.autograd.grad(got, [x2, w]), torch.autograd.grad(expected, [x1, pml.proxies])):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)


def test_the_papers_formula_on_a_hand_derived_case():
    """x = p_0 = (1, 0), p_1 = (0, 1): d(x, p_0) = 0, d(x, p_1) = ||x - p_1||^2 = 2."""
    x, labels = torch.tensor([[3.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    head = ProxyNCAHead(2, 2, softmax_scale=1.0).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
    # PML / ProxyNCA++: -log(e^0 / (e^0 + e^-2)) = log(1 + e^-2)
    assert head(x, labels).loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-15)
    # the paper's eq. (negatives only in the denominator): -log(e^0 / e^-2) = -2
    head.exclude_positive = True
    assert head(x, labels).loss.item() == pytest.approx(-2.0, abs=1e-15)
    torch.testing.assert_close(head(x), torch.tensor([[0.0, -2.0]], dtype=torch.float64))


def test_exclude_positive_is_the_papers_loss_on_a_batch():
    x, labels = batch(1)
    head = ProxyNCAHead(8, 10, softmax_scale=4.0, exclude_positive=True).double()
    d = torch.cdist(F.normalize(x), F.normalize(head.weight.detach())) ** 2  # squared distances of unit vectors
    expected = torch.stack(
        [4.0 * d[i, y] + torch.logsumexp(-4.0 * d[i, torch.arange(10) != y], 0) for i, y in enumerate(labels.tolist())]
    ).mean()
    torch.testing.assert_close(head(x, labels).loss, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("exclude_positive", [False, True])
def test_gradcheck_float64(hh, exclude_positive):
    head = ProxyNCAHead(6, 5, softmax_scale=3.0, exclude_positive=exclude_positive).double()
    x, labels = hh.make_batch(head, batch=7, special=False)
    inputs = (x.double().requires_grad_(True), head.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x_, w: head_loss(head, x_, labels, w), inputs)


def test_a_loss_of_its_own_through_the_criterion():
    x, labels = batch(2)
    head = ProxyNCA(8, 10)
    out = head(x.float(), labels)
    assert isinstance(out, HeadLoss) and out.loss.dim() == 0
    criterion = MarginLoss(head)
    torch.testing.assert_close(criterion(x.float(), labels), out.loss)
    torch.testing.assert_close(criterion.step(x.float(), out, labels).predicted, head.cosine(x.float()).argmax(1))


def test_bad_hyperparameters_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"^softmax_scale=0.0 is not allowed: it must lie in \(0, inf\]"):
        ProxyNCAHead(8, 10, softmax_scale=0.0)


def test_config_builds_with_its_defaults_and_has_no_margin_to_advise(hh):
    from marginlab.training.margin_feasibility import advise

    head = hh.instantiate("proxy_nca")
    assert (head.softmax_scale, head.exclude_positive, head.official_init) == (32.0, False, "normal_1")
    assert advise(head) is None  # no cosine margin: nothing for the advisor to check


def test_chunked_and_partial_fc_are_refused_in_one_line(run_train, capfd):
    err = chunked_and_partial_fc_errors(run_train, capfd, "proxy_nca")
    assert err[0].startswith(
        "marginlab: error: chunked=true is not allowed with ProxyNCAHead: the chunked cross-entropy"
    )
    assert "is not available for it, as it is a loss of its own" in err[0]
    assert err[1].startswith("marginlab: error: Partial FC cannot shard ProxyNCAHead: it is a loss of its own")


def test_trains_and_resumes_exactly_through_the_cli(run_train, metrics, tmp_path, monkeypatch):
    last = check_resume_exact(run_train, metrics, tmp_path, monkeypatch, "head=proxy_nca")
    assert last["train/nonfinite_steps"] == 0 and last["test/acc"] > 0.2  # 10 classes: chance is 0.1
