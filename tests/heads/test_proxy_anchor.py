"""Proxy-Anchor head: equal in float64 to a port of the official code and to pytorch-metric-learning's
ProxyAnchorLoss (loss, dx, d proxies), and to the paper's eq. 4 on a hand-derived case; training + resume via the
CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError
from marginlab.heads import ProxyAnchor
from marginlab.heads.output import HeadLoss
from marginlab.heads.proxy_anchor import ProxyAnchorHead
from marginlab.losses import MarginLoss
from tests.heads.checks import check_resume_exact, chunked_and_partial_fc_errors, loss_and_grads
from tests.heads.checks import float64_batch as batch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def official_proxy_anchor(x, proxies, labels, nb_classes, mrg=0.1, alpha=32):
    """tjddus9597/Proxy-Anchor-CVPR2020 (51db570) code/losses.py Proxy_Anchor.forward, line for line (sklearn's
    label_binarize as one_hot, no cuda)."""

    def l2_norm(t):
        return t / torch.sqrt(torch.sum(t**2, 1).add_(1e-12)).view(-1, 1)

    cos = F.linear(l2_norm(x), l2_norm(proxies))
    P_one_hot = F.one_hot(labels, nb_classes).to(x.dtype)
    N_one_hot = 1 - P_one_hot
    pos_exp = torch.exp(-alpha * (cos - mrg))
    neg_exp = torch.exp(alpha * (cos + mrg))
    with_pos_proxies = torch.nonzero(P_one_hot.sum(dim=0) != 0).squeeze(dim=1)
    num_valid_proxies = len(with_pos_proxies)
    P_sim_sum = torch.where(P_one_hot == 1, pos_exp, torch.zeros_like(pos_exp)).sum(dim=0)
    N_sim_sum = torch.where(N_one_hot == 1, neg_exp, torch.zeros_like(neg_exp)).sum(dim=0)
    pos_term = torch.log(1 + P_sim_sum).sum() / num_valid_proxies
    neg_term = torch.log(1 + N_sim_sum).sum() / nb_classes
    return pos_term + neg_term


def head_loss(head, x, labels, weight):
    return torch.func.functional_call(head, {"weight": weight}, (x, labels)).loss


@pytest.mark.parametrize("margin, alpha", [(0.1, 32.0), (0.3, 8.0), (0.0, 1.0)])
def test_equals_the_official_port_and_pytorch_metric_learning_in_float64(margin, alpha):
    x, labels = batch(b=12, c=20)  # some proxies have no positive in the batch
    assert len(labels.unique()) < 20
    pml = pml_losses.ProxyAnchorLoss(20, 8, margin=margin, alpha=alpha).double()
    head = ProxyAnchorHead(8, 20, margin=margin, alpha=alpha).double()
    ours = loss_and_grads(lambda x_, w: head_loss(head, x_, labels, w), x, pml.proxies)
    official = loss_and_grads(lambda x_, w: official_proxy_anchor(x_, w, labels, 20, margin, alpha), x, pml.proxies)
    x_ = x.clone().requires_grad_(True)
    expected = pml(x_, labels)
    theirs = (expected, *torch.autograd.grad(expected, [x_, pml.proxies]))
    for name, g, o, p in zip(("loss", "dx", "dW"), ours, official, theirs):
        torch.testing.assert_close(g, p, atol=1e-12, rtol=1e-12, msg=f"{name} vs PML")
        # the official's +1e-12 under the norm's square root and exp-then-log move it by ~1e-11 (at alpha 32)
        torch.testing.assert_close(g, o, atol=1e-10, rtol=1e-10, msg=f"{name} vs official")


def test_the_papers_eq_4_on_a_hand_derived_case():
    """x at p_0 = (1, 0), p_1 = (0, 1), label 0: P+ = {p_0}; p_0 has no negative, x is p_1's negative at cos 0."""
    head = ProxyAnchorHead(2, 2, margin=0.1, alpha=32.0).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.5]]))
    x, labels = torch.tensor([[2.0, 0.0]], dtype=torch.float64), torch.tensor([0])
    # (1/|P+|) log(1 + e^(-32 (1 - 0.1))) + (1/|P|) [log(1 + 0) + log(1 + e^(32 (0 + 0.1)))]
    expected = math.log1p(math.exp(-28.8)) + math.log1p(math.exp(3.2)) / 2
    assert head(x, labels).loss.item() == pytest.approx(expected, abs=1e-14)
    torch.testing.assert_close(head(x), torch.tensor([[1.0, 0.0]], dtype=torch.float64))


def test_gradcheck_float64(hh):
    head = ProxyAnchorHead(6, 5, margin=0.1, alpha=4.0).double()
    x, labels = hh.make_batch(head, batch=7, special=False)
    inputs = (x.double().requires_grad_(True), head.weight.detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda x_, w: head_loss(head, x_, labels, w), inputs)


def test_a_loss_of_its_own_through_the_criterion_and_finite_at_the_awkward_rows(hh):
    head = ProxyAnchor(8, 10)
    x, labels = hh.make_batch(head, batch=12)  # collinear, opposite and zero features
    out = head(x, labels)
    assert isinstance(out, HeadLoss) and torch.isfinite(out.loss)
    criterion = MarginLoss(head)
    torch.testing.assert_close(criterion(x, labels), out.loss)
    torch.testing.assert_close(criterion.step(x, out, labels).predicted, head.cosine(x).argmax(1))
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(x, labels).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"margin": -0.1}, "margin=-0.1 is not allowed: it must lie in [0, 1]"),
        ({"alpha": 0.0}, "alpha=0.0 is not allowed: it must lie in (0, inf]"),
    ],
)
def test_bad_hyperparameters_are_refused_naming_the_key(kwargs, words):
    with pytest.raises(ConfigError) as err:
        ProxyAnchorHead(8, 10, **kwargs)
    assert str(err.value).startswith(words)


def test_config_builds_with_the_official_defaults_and_has_no_margin_to_advise(hh):
    from marginlab.training.margin_feasibility import advise

    head = hh.instantiate("proxy_anchor")
    assert (head.margin, head.alpha, head.official_init) == (0.1, 32.0, "kaiming_normal_fan_out")
    assert head.lr_mult == 100.0  # the official proxies' learning rate
    assert advise(head) is None  # no cosine margin on one sample's softmax: nothing for the advisor to check


def test_chunked_and_partial_fc_are_refused_in_one_line(run_train, capfd):
    err = chunked_and_partial_fc_errors(run_train, capfd, "proxy_anchor")
    assert err[0].startswith(
        "marginlab: error: chunked=true is not allowed with ProxyAnchorHead: the chunked cross-entropy"
    )
    assert "is not available for it, as it is a loss of its own" in err[0]
    assert err[1].startswith("marginlab: error: Partial FC cannot shard ProxyAnchorHead: it is a loss of its own")


def test_trains_and_resumes_exactly_through_the_cli(run_train, metrics, tmp_path, monkeypatch):
    last = check_resume_exact(run_train, metrics, tmp_path, monkeypatch, "head=proxy_anchor")
    assert last["train/nonfinite_steps"] == 0 and last["test/acc"] > 0.2  # 10 classes: chance is 0.1
