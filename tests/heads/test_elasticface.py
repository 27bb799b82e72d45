"""ElasticFace: equal to a float64 port of the official code (logits, dx, dW, margins), the plus pairings, the
seeded margin stream and its resume, chunked CE, Partial FC refused, config, advisor, CLI training + resume."""

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from marginlab.config.validate import resolve_head
from marginlab.errors import ConfigError
from marginlab.heads import ElasticFace, ElasticFaceHead
from marginlab.heads.output import HeadLoss
from marginlab.training.builders import build_head
from marginlab.training.margin_feasibility import advise
from tests.conftest import last_weights
from tests.heads.conftest import HEAD_CONFIGS
from tests.heads.official.elasticface import elastic_forward

B, C, D = 7, 5, 6
CASES = [(v, p, pairing) for v in ("arc", "cos") for p in (False, True) for pairing in ("official", "paper")]


def make(variant="arc", plus=False, plus_pairing="official", seed=3, **kw):
    torch.manual_seed(0)
    head = ElasticFaceHead(D, C, variant=variant, plus=plus, plus_pairing=plus_pairing, seed=seed, **kw).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    return head, x, y


def official(head, x, y, step=0, plus=None):
    """The official forward's logits and (dx, dW) of its cross-entropy, margins from the head's step seed."""
    xo = x.clone().requires_grad_(True)
    kernel = head.weight.detach().t().clone().requires_grad_(True)  # the official D x C kernel
    gen = torch.Generator().manual_seed(head.generator_seed(step))
    logits = elastic_forward(
        xo, kernel, y, head.s, head.m, head.std, head.plus if plus is None else plus, head.variant, gen
    )
    F.cross_entropy(logits, y).backward()
    return logits.detach(), xo.grad, kernel.grad.t()


def ours(head, x, y):
    xo = x.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    logits = head.train()(xo, y)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), xo.grad, head.weight.grad


@pytest.mark.parametrize("variant", ["arc", "cos"])
@pytest.mark.parametrize("plus", [False, True])
def test_equals_the_official_code_in_float64(variant, plus):
    head, x, y = make(variant, plus)
    for step in range(3):  # a fresh draw every step, the same as the official code given the same generator
        expected = official(head, x, y, step)
        got = ours(head, x, y)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert head.step.item() == step + 1


def test_margins_are_the_seeded_normal_draws_in_batch_order():
    head, x, y = make("arc", False)
    head.train()(x, y)
    draws = torch.normal(0.5, 0.05, size=(B, 1), generator=torch.Generator().manual_seed(head.generator_seed(0)))
    assert torch.equal(head.last_margins, draws.view(-1))
    head(x, y)
    assert not torch.equal(head.last_margins, draws.view(-1))  # the next step draws afresh


def test_plus_pairings_on_a_hand_case():
    """cos = (0.1, 0.9, 0.5): order (largest first) = (1, 2, 0); sorted draws a < b < c. The paper gives the largest
    cosine the smallest draw, (c, a, b); the official gather gives sorted[order] = (b, c, a)."""
    w = torch.eye(3, 3, dtype=torch.float64)
    cos = torch.tensor([0.1, 0.9, 0.5], dtype=torch.float64)
    x = torch.stack([cos, (1 - cos**2).sqrt(), torch.zeros(3, dtype=torch.float64)], 1)  # unit, cos to class 0
    y = torch.zeros(3, dtype=torch.long)
    draws = {}
    for pairing in ("official", "paper"):
        head = ElasticFaceHead(3, 3, variant="cos", plus=True, plus_pairing=pairing, seed=0).double()
        with torch.no_grad():
            head.weight.copy_(w)
        head.train()(x, y)
        draws[pairing] = head.last_margins
    a, b, c = torch.normal(0.35, 0.02, (3, 1), generator=torch.Generator().manual_seed(0)).view(-1).sort().values
    assert draws["paper"].tolist() == [c, a, b]
    assert draws["official"].tolist() == [b, c, a]


def test_paper_pairing_sorts_margins_against_cosines():
    head, x, y = make("arc", True, "paper")
    head.train()(x, y)
    cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
    order = cos.gather(1, y.view(-1, 1)).view(-1).argsort(descending=True)
    assert torch.all(head.last_margins[order].diff() >= 0)  # larger cosine, smaller margin


def test_step_and_margins_resume_exactly():
    """Six optimizer steps straight equal three, a state_dict round trip into a fresh head, and three more."""

    def train(head, opt, steps, x, y):
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(x, y), y).backward()
            opt.step()

    head, x, y = make("arc", True)
    start = copy.deepcopy(head.state_dict())
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    train(head, opt, 6, x, y)
    straight, straight_margins = head.state_dict(), head.last_margins

    first, _, _ = make("arc", True)
    first.load_state_dict(start)
    opt1 = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    train(first, opt1, 3, x, y)
    saved, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    assert saved["step"].item() == 3
    resumed, _, _ = make("arc", True)
    resumed.load_state_dict(saved)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 3, x, y)
    for key, value in straight.items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert torch.equal(resumed.last_margins, straight_margins)


def test_chunked_loss_equals_the_official_cross_entropy():
    head, x, y = make("arc", True, chunked=True)
    xo = x.clone().requires_grad_(True)
    out = head.train()(xo, y)  # the mean cross-entropy itself, in class blocks (heads/output.py)
    assert isinstance(out, HeadLoss) and out.loss.dim() == 0
    loss = out.loss
    loss.backward()
    ref, _, _ = make("arc", True)
    logits, dx, dw = official(ref, x, y)
    torch.testing.assert_close(loss.detach(), F.cross_entropy(logits, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xo.grad, dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, dw, rtol=1e-10, atol=1e-12)
    assert head.step.item() == 1


def test_gradcheck_float64_with_drawn_margins():
    head, x, y = make("arc", False)
    w = head.weight.detach().clone().requires_grad_(True)
    x = x.requires_grad_(True)
    head.train()

    def fn(x_, w_):
        head.step.zero_()  # the same draw every evaluation
        return torch.func.functional_call(head, {"weight": w_, "step": head.step}, (x_, y))

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-5)


def test_evaluation_applies_the_mean_margin_and_draws_nothing():
    head, x, y = make("cos", False)
    head.eval()
    logits = head(x, y)
    cos = F.normalize(x) @ F.normalize(head.weight.detach()).T
    expected = (cos - 0.35 * F.one_hot(y, C).double()) * 64.0
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-10)
    assert head.step.item() == 0 and head.last_margins is None
    torch.testing.assert_close(head(x), 64.0 * cos, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"variant": "sphere"}, "variant='sphere' is not allowed: it must be one of arc, cos"),
        ({"plus_pairing": "x"}, "plus_pairing='x' is not allowed: it must be one of official, paper"),
        ({"m": 2.0}, "m=2.0 is not allowed"),
        ({"std": -0.1}, "std=-0.1 is not allowed"),
        ({"seed": -1}, "seed=-1 is not allowed: it must be an integer >= 0 or null"),
        ({"s": 0.0}, "s=0.0 is not allowed"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        ElasticFaceHead(D, C, **kwargs)


def test_partial_fc_is_refused_in_one_line(hh):
    with pytest.raises(ConfigError, match=r"^Partial FC cannot shard ElasticFaceHead: its per-sample margins"):
        hh.instantiate("elasticface", **{"partial_fc": {"sample_rate": 0.5}})


@pytest.mark.parametrize(
    "variant, plus, m, std", [("arc", False, 0.5, 0.05), ("arc", True, 0.5, 0.0175), ("cos", False, 0.35, 0.05)]
)
def test_config_builds_with_the_official_defaults_per_variant(hh, variant, plus, m, std):
    head = hh.instantiate("elasticface", variant=variant, plus=plus)
    assert type(head) is ElasticFace is ElasticFaceHead
    assert (head.s, head.m, head.std, head.plus_pairing) == (64.0, m, std, "official")
    assert hh.instantiate("elasticface", variant="cos", plus=True).std == 0.02


def test_seed_null_takes_the_run_seed():
    node = OmegaConf.load(HEAD_CONFIGS / "elasticface.yaml")
    assert node.seed is None
    assert build_head(resolve_head(node), D, C, seed=11).generator_seed(0) == 11 * 1_000_003**2


def test_margin_advisor_verdicts():
    assert advise(ElasticFaceHead(2, 10, s=10.0, m=0.2)).verdict == "ok"  # 36 deg apart, m = 11.5 deg
    assert advise(ElasticFaceHead(2, 10, m=0.7)).verdict == "infeasible"  # m = 40 deg > 36 deg
    assert advise(ElasticFaceHead(2, 10, s=10.0, m=0.1, variant="cos")).verdict == "ok"


def test_trains_and_resumes_exactly_through_the_cli(straight_and_resumed, metrics):
    run = ["logger=quiet", "trainer.epochs=2", "head=elasticface", "s=10", "m=0.2", "head.plus=true"]
    straight, split = straight_and_resumed(*run)
    assert metrics[1](straight)[-1]["test/acc"] > 0.5
    a, b = last_weights(straight), last_weights(split)
    assert a["head.step"].item() > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("variant", ["arc", "cos"])
def test_bf16_autocast_and_cos_pm1_and_zero_features_are_finite(hh, variant):
    head = ElasticFaceHead(D, C, variant=variant, plus=True)
    hh.check_bf16(head, *hh.make_batch(head, batch=B, seed=5))  # rows: cos = +1, cos = -1, zero norm
    assert torch.isfinite(head.last_margins).all()
