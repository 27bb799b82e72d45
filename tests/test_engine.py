"""The loop: non-finite losses, precision paths, optimizer parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marginlab.errors import TrainingError
from marginlab.heads.softmax import SoftmaxHead
from marginlab.training.builders import MarginModel
from marginlab.training.engine import LoopOptions, LoopState, StepParts, train_one_epoch
from marginlab.training.precision import Precision

FAST = ["logger=quiet", "trainer.epochs=1", "trainer.checkpoint=false"]


def tiny_model():
    torch.manual_seed(0)
    return MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), SoftmaxHead(3, 2), nn.ModuleDict())


def batches(nan_at=()):
    out = []
    for i in range(6):
        x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(i))
        if i in nan_at:
            x[0, 0, 0, 0] = float("nan")
        out.append((x, torch.tensor([0, 1, 0, 1, 1])))
    return out


def run_epoch(model, loader, max_nonfinite=3, log_every=2, log=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = LoopState()
    stats = train_one_epoch(
        StepParts(model, opt, sched),
        loader,
        Precision(torch.device("cpu"), "32"),
        state,
        LoopOptions(grad_clip=None, max_nonfinite=max_nonfinite, channels_last=False, log_every=log_every),
        log=log,
    )
    return stats, state


def test_nonfinite_loss_skips_the_step_and_is_counted():
    model = tiny_model()
    stats, state = run_epoch(model, batches(nan_at=(1, 4)))
    assert stats["nonfinite_steps"] == 2 and state.nonfinite_total == 2
    assert state.step == 4  # 6 batches, 2 skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_nonfinite_losses_stop_with_a_clear_message():
    model = tiny_model()
    with pytest.raises(TrainingError, match="3 consecutive non-finite losses"):
        run_epoch(model, batches(nan_at=(2, 3, 4)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_diverging_run_fails_cleanly_and_keeps_finite_checkpoint(run_train, capfd, metrics):
    code, run_dir = run_train(
        "logger=quiet", "trainer.epochs=2", "optim.lr=1e30", "trainer.max_nonfinite_steps=2", "head=softmax"
    )
    err = capfd.readouterr().err
    assert code == 2 and "consecutive non-finite losses" in err and "Traceback" not in err
    assert metrics[0](run_dir)["status"] == "failed"


def test_bf16_autocast_on_cpu_trains(run_train, metrics):
    code, run_dir = run_train(*FAST, "trainer.precision=bf16", "head=arcface")
    assert code == 0
    summary = metrics[0](run_dir)
    assert summary["precision"] == "bf16" and summary["train/nonfinite_steps"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16", "32"])
def test_cuda_amp_paths(run_train, metrics, precision):
    code, run_dir = run_train(*FAST, "trainer.device=cuda", f"trainer.precision={precision}", "head=arcface")
    assert code == 0
    summary = metrics[0](run_dir)
    assert summary["device"].startswith("cuda") and summary["precision"] == precision


def test_head_weight_decay_is_a_separate_group():
    from omegaconf import OmegaConf

    from marginlab.training.builders import build_optimizer

    cfg = OmegaConf.create(
        {
            "optim": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "weight_decay": 5e-4},
            "trainer": {"head_weight_decay": 0.0},
        }
    )
    opt = build_optimizer(cfg, tiny_model())
    assert [g["name"] for g in opt.param_groups] == ["backbone", "head"]
    assert opt.param_groups[0]["weight_decay"] == 5e-4 and opt.param_groups[1]["weight_decay"] == 0.0


def test_step_statistics_are_asked_only_on_the_steps_that_log_geometry():
    model = tiny_model()
    seen, asked = [], []
    real_forward, real_cosine = model.head.forward, model.head.cosine

    def spy(embeddings, labels=None, *, stats=False):
        seen.append(stats)
        return real_forward(embeddings, labels, stats=stats)

    def cosine_spy(embeddings):
        asked.append(len(seen))
        return real_cosine(embeddings)

    model.head.forward, model.head.cosine = spy, cosine_spy
    logged = []

    class Log:
        def scalars(self, values, step, prefix=""):
            logged.append((step, "angle/target_deg" in values))

    run_epoch(model, batches(), log_every=3, log=Log())
    assert seen == [False, False, True, False, False, True]  # steps 1..6, logged at 3 and 6
    assert asked == [3, 6]  # the head's pure cosine only there (a logits head computes no statistics itself)
    assert logged == [(3, True), (6, True)]  # and those steps log the geometry


def test_a_chunked_head_logs_the_step_geometry_from_its_blocks():
    from marginlab.heads.arcface import ArcFaceHead

    torch.manual_seed(0)
    model = MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), ArcFaceHead(3, 2, chunked=True), nn.ModuleDict())
    logged, outputs = [], []
    real_forward = model.head.forward

    def spy(embeddings, labels=None, *, stats=False):
        out = real_forward(embeddings, labels, stats=stats)
        outputs.append((out.loss.dim(), out.stats is not None))
        return out

    model.head.forward, model.head.cosine = spy, None  # (never asked: the blocks give the statistics)

    class Log:
        def scalars(self, values, step, prefix=""):
            logged.append((step, sorted(k for k in values if "/" in k)))

    run_epoch(model, batches(), log_every=3, log=Log())
    # the loss on every step, the geometry steps too (with their statistics): never the B x C logits
    assert outputs == [(0, False), (0, False), (0, True)] * 2
    keys = ["angle/nearest_other_deg", "angle/target_deg", "feature_norm/max", "feature_norm/mean"]
    assert [step for step, _ in logged] == [3, 6] and all(set(keys) <= set(k) for _, k in logged)
