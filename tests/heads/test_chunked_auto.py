"""``head.chunked=auto`` (heads/base.py ``CosineMarginHead.chunks``): the unfused head's logits below
``chunked_above_bytes``, the chunked loss of ``chunked=true`` at and above it; a head or regularizer that cannot
take the chunked loss makes auto stay unchunked, said once in the log; bad values are one line."""

from __future__ import annotations

import copy
import logging
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from marginlab.distributed.partial_fc import PartialFC
from marginlab.errors import ConfigError
from marginlab.heads.adaface import AdaFaceHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.base import CHUNKED_AUTO_BYTES
from marginlab.heads.output import HeadLoss, HeadScores
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead
from marginlab.losses import MarginLoss
from marginlab.regularizers.incay import FeatureIncay
from marginlab.training.builders import MarginModel
from marginlab.training.engine import LoopOptions, LoopState, StepParts, train_one_epoch
from marginlab.training.precision import Precision

DIM, CLASSES, BATCH = 6, 11, 9
LOGGER = "marginlab.heads.base"

#: a head with a plain margin, one with sub-centres (k weight rows per class) and one with its own chunked margin
HEADS = {
    "arcface": partial(ArcFaceHead, s=64.0, m=0.5),
    "subcenter_arcface": partial(SubCenterArcFaceHead, s=64.0, m=0.5, k=3),
    "adaface": partial(AdaFaceHead, s=64.0, m=0.4, h=0.333),
}


def pair(make, **auto):
    """(the head with chunked=false, the same head with chunked=auto and ``auto``'s keys), float64, equal weights."""
    torch.manual_seed(0)
    plain = make(DIM, CLASSES).double()
    head = make(DIM, CLASSES, chunked="auto", **auto).double()
    head.load_state_dict(plain.state_dict())
    return plain, head


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, DIM, generator=gen, dtype=torch.float64) * 3, torch.tensor([0, 3, 10, 5, 5, 7, 9, 1, 4])


def loss_and_grads(head, x, labels):
    """The head's training loss (its HeadLoss, or F.cross_entropy of its logits) and d/dx, d/dW."""
    x = x.clone().requires_grad_(True)
    out = head(x, labels)
    loss = out.loss if isinstance(out, HeadLoss) else F.cross_entropy(out, labels)
    return (loss.detach(), *torch.autograd.grad(loss, [x, head.weight]))


def logits_bytes(head):
    """Bytes of this test's B x C float32 logits, C the weight rows (k per class with sub-centres)."""
    return BATCH * head.weight.shape[0] * 4


@pytest.mark.parametrize("name", sorted(HEADS))
def test_below_the_threshold_auto_returns_the_unfused_logits_exactly(name):
    plain, head = pair(HEADS[name])  # the default threshold, 1 GiB
    x, labels = batch()
    assert head.chunked == "auto" and head.chunked_above_bytes == CHUNKED_AUTO_BYTES == 2**30
    logits = head(x, labels)
    assert logits.shape == (BATCH, CLASSES) and torch.equal(logits, plain(x, labels))
    for got, want in zip(loss_and_grads(head, x, labels), loss_and_grads(plain, x, labels)):
        assert torch.equal(got, want)
    # one byte short of the threshold is still below it
    head.chunked_above_bytes = logits_bytes(head) + 1
    assert head(x, labels).shape == (BATCH, CLASSES)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_at_the_threshold_auto_is_chunked_true_and_equals_the_unfused_head(name, caplog):
    plain, head = pair(HEADS[name])
    head.chunked_above_bytes = logits_bytes(head)  # B x C x 4 bytes: at the threshold, which chunks
    torch.manual_seed(0)
    chunked = HEADS[name](DIM, CLASSES, chunked=True).double()
    chunked.load_state_dict(plain.state_dict())
    twin = copy.deepcopy(head)  # (AdaFace's running statistics move each step: every head makes its first)
    x, labels = batch()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        got = loss_and_grads(head, x, labels)
        assert isinstance(head(x, labels), HeadLoss)  # the loss itself, never the B x C logits
    # (read now: the twin's own first step logs its line too, where an earlier test left the level at INFO)
    lines = [r.getMessage() for r in caplog.records if "chunked=auto" in r.getMessage()]
    for a, b, c, d in zip(
        got, loss_and_grads(twin, x, labels), loss_and_grads(chunked, x, labels), loss_and_grads(plain, x, labels)
    ):
        assert torch.equal(a, c) and torch.equal(a, b)  # chunked=true's numbers, bit for bit, on every call
        torch.testing.assert_close(a, d, rtol=1e-9, atol=1e-12)
    size = logits_bytes(head)
    assert lines == [
        f"{type(head).__name__}: head.chunked=auto chunks the training steps this large: B={BATCH} x "
        f"C={head.weight.shape[0]} float32 logits take {size} bytes >= chunked_above_bytes={size}"
    ]
    head.eval()  # evaluation is never chunked
    assert head(x, labels).shape == (BATCH, CLASSES) and head(x).shape == (BATCH, CLASSES)


def test_the_criterion_follows_the_step_size():
    plain, head = pair(HEADS["arcface"], chunked_above_bytes=BATCH * CLASSES * 4)
    x, labels = batch()
    criterion = MarginLoss(head)
    calls = []
    head.chunked_loss = lambda *a, **k: calls.append(a[0].shape[0]) or type(head).chunked_loss(head, *a, **k)
    full = criterion(x, labels)
    smaller = criterion(x[:-1], labels[:-1])  # (B - 1) x C is below the threshold: unfused
    assert calls == [BATCH]
    torch.testing.assert_close(full, MarginLoss(plain)(x, labels), rtol=1e-6, atol=0)  # (its CE is float32)
    assert torch.equal(smaller, MarginLoss(plain)(x[:-1], labels[:-1]))


@pytest.mark.parametrize("sample_rate", [1.0, 0.5], ids=["all classes", "sampled"])
def test_partial_fc_decides_on_the_rows_it_scores(sample_rate):
    """C is the Partial FC sample: auto chunks at B x n_sampled x 4 bytes, not B x C_local x 4."""
    plain, head = pair(HEADS["arcface"])
    x, labels = batch()
    sampled = PartialFC(head, CLASSES, sample_rate=sample_rate, seed=5)
    sampled(x, labels)  # (Partial FC's forward samples; the count is fixed by the seed and the step)
    rows = CLASSES if sampled.last_sampled is None else sampled.last_sampled.numel()
    assert rows < CLASSES if sample_rate < 1 else rows == CLASSES
    results = []
    for threshold, chunks in ((BATCH * rows * 4 + 1, False), (BATCH * rows * 4, True)):
        head.chunked_above_bytes = threshold
        calls = []
        head.chunked_loss = lambda *a, **k: calls.append(1) or type(head).chunked_loss(head, *a, **k)
        pfc = PartialFC(head, CLASSES, sample_rate=sample_rate, seed=5)
        emb = x.clone().requires_grad_(True)
        loss = pfc(emb, labels).loss
        assert bool(calls) is chunks
        results.append((loss.detach(), *torch.autograd.grad(loss, [emb, head.weight])))
    for chunked, unfused in zip(results[1], results[0]):
        torch.testing.assert_close(chunked, unfused, rtol=1e-9, atol=1e-12)


def test_auto_on_a_head_that_cannot_be_chunked_trains_unchunked_and_says_so_once(caplog):
    class Halved(ArcFaceHead):
        def normalized_cosine(self, embeddings):
            return super().normalized_cosine(embeddings) / 2

    with pytest.raises(ConfigError, match="chunked=true is not allowed with Halved"):
        Halved(DIM, CLASSES, chunked=True)  # true still refuses
    with caplog.at_level(logging.INFO, logger=LOGGER):
        head = Halved(DIM, CLASSES, chunked="auto", chunked_above_bytes=1).double()
        criterion = MarginLoss(head)
        assert head.unchunkable is not None and criterion.classifies
        trained = train(head, criterion)
    assert trained == [(BATCH, CLASSES)] * 3
    lines = [r.getMessage() for r in caplog.records if "chunked=auto" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("Halved: head.chunked=auto never chunks it: its logits are not")


def test_auto_with_a_regularizer_that_needs_the_logits_trains_unchunked_and_says_so_once(caplog):
    with pytest.raises(ConfigError, match="regularizer 'FeatureIncay' needs the logits"):
        MarginLoss(ArcFaceHead(DIM, CLASSES, chunked=True), [FeatureIncay(DIM, CLASSES)])  # true still refuses
    plain, head = pair(HEADS["arcface"], chunked_above_bytes=1)
    x, labels = batch()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        criterion = MarginLoss(head, [FeatureIncay(DIM, CLASSES)])
        MarginLoss(head, [FeatureIncay(DIM, CLASSES)])  # (the trainer builds its criterion every epoch)
        assert criterion.classifies
        assert torch.equal(criterion(x, labels), MarginLoss(plain, [FeatureIncay(DIM, CLASSES)])(x, labels))
        trained = train(head, criterion)
    assert trained == [(BATCH, CLASSES)] * 3
    lines = [r.getMessage() for r in caplog.records if "chunked=auto" in r.getMessage()]
    assert lines == ["ArcFaceHead: head.chunked=auto never chunks it: regularizer 'FeatureIncay' needs the logits"]


def train(head, criterion, steps=3):
    """``steps`` SGD steps on the criterion; the shapes of the head's training outputs (W must move)."""
    x, labels = batch()
    x = x.to(head.weight.dtype)
    shapes, before = [], head.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(steps):
        out = head(x, labels)
        shapes.append(tuple(out.loss.shape if isinstance(out, HeadLoss) else out.shape))
        loss = criterion.from_head_output(x, out, labels)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(head.weight.detach(), before)
    return shapes


def one_epoch(head, lr=0.1):
    """``train_one_epoch`` of a tiny backbone + ``head`` over batches of 5, 5 and 3; (epoch stats, the head's
    output rank per step: 0 the chunked loss, 2 logits)."""
    torch.manual_seed(0)
    model = MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), head, nn.ModuleDict())
    outputs, real_forward = [], head.forward

    def spy(embeddings, labels=None, *, stats=False):
        out = real_forward(embeddings, labels, stats=stats)
        logits = out.logits if isinstance(out, HeadScores) else out  # (a step that logs geometry: HeadScores)
        outputs.append(out.loss.dim() if isinstance(out, HeadLoss) else logits.dim())
        return out

    head.forward = spy
    loader = [
        (torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(n)), torch.arange(n) % 2) for n in (5, 5, 3)
    ]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = train_one_epoch(
        StepParts(model, opt, sched),
        loader,
        Precision(torch.device("cpu"), "32"),
        LoopState(),
        LoopOptions(grad_clip=None, max_nonfinite=3, channels_last=False, log_every=1),
    )
    return stats, outputs


def test_the_training_loop_runs_an_auto_head_chunked_and_unchunked():
    """The engine with auto: the full batches are chunked, the short last one is not; the epoch's training
    accuracy counts every step, from the blocks' argmax or from the logits (lr 0: the same as the unfused twin's)."""
    torch.manual_seed(0)
    stats, outputs = one_epoch(ArcFaceHead(3, 2, chunked="auto", chunked_above_bytes=5 * 2 * 4))
    assert outputs == [0, 0, 2] and stats["nonfinite_steps"] == 0
    torch.manual_seed(0)
    head = ArcFaceHead(3, 2, s=4.0, m=0.1, chunked="auto", chunked_above_bytes=5 * 2 * 4)
    plain = copy.deepcopy(head)
    plain.chunked = False
    (stats, outputs), (want, _) = one_epoch(head, lr=0.0), one_epoch(plain, lr=0.0)
    assert outputs == [0, 0, 2] and 0 < want["acc"] < 1 and stats["acc"] == want["acc"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"chunked": "yes"}, "chunked='yes' is not allowed: it must be true, false or auto"),
        ({"chunked": 1}, "chunked=1 is not allowed: it must be true, false or auto"),
        ({"chunked": "auto", "chunked_above_bytes": 0}, "chunked_above_bytes"),
    ],
)
def test_bad_values_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        ArcFaceHead(DIM, CLASSES, **kwargs)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def compose_train():
    from hydra import compose, initialize_config_module

    import marginlab.config  # noqa: F401  (the schema and resolvers)

    with initialize_config_module("marginlab.configs", version_base="1.3"):
        yield lambda *overrides: compose("train", overrides=list(overrides))


@pytest.mark.parametrize("name", ["arcface", "subcenter_arcface", "curricularface"])
def test_a_composed_config_with_chunked_auto_builds(compose_train, name):
    from marginlab.config.validate import validate
    from marginlab.training.builders import build_head

    assert compose_train(f"head={name}").head.chunked is False  # the shipped default
    default = build_head(validate(compose_train(f"head={name}", "head.chunked=auto")), 4, 3)
    assert default.chunked == "auto" and default.chunked_above_bytes == CHUNKED_AUTO_BYTES
    spec = validate(compose_train(f"head={name}", "head.chunked=auto", "+head.chunked_above_bytes=4096"))
    head = build_head(spec, in_features=4, num_classes=3)
    assert head.chunked == "auto" and head.chunked_above_bytes == 4096 and head.unchunkable is None


def test_a_composed_config_with_another_chunked_value_is_refused_with_one_line(compose_train):
    from marginlab.config.validate import validate

    with pytest.raises(ConfigError) as info:
        validate(compose_train("head=arcface", "head.chunked=sometimes"))
    assert str(info.value) == (
        "head.chunked='sometimes' is not allowed: it must be true or false or auto (ArcFaceHead.chunked)"
    )
