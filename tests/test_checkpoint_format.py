"""checkpoint.py owns the format (issue #17): the payload, LoopState, saving, restoring a job, finding a file."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from marginlab.distributed import sharded_state
from marginlab.distributed.partial_fc import PartialFC
from marginlab.errors import ConfigError
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.losses import criterion_for
from marginlab.training import checkpoint
from marginlab.training.builders import MarginModel
from marginlab.training.checkpoint import (
    checkpoint_payload,
    find_checkpoint,
    load_training_state,
    save_checkpoints,
)
from marginlab.training.engine import LoopState

DATA = SimpleNamespace(in_channels=1, image_size=2, num_classes=5)
CONFIG = OmegaConf.create({"head": {"_target_": "marginlab.heads.amsoftmax.AMSoftmaxHead"}, "seed": 0})


def job(seed: int):
    """A Partial FC model (its sampling step is the loss's own checkpoint entry), its optimizer and schedule."""
    torch.manual_seed(seed)
    model = MarginModel(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 4)),
        PartialFC(AMSoftmaxHead(4, 5), 5, sample_rate=0.6),
        nn.ModuleDict(),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5), torch.amp.GradScaler("cpu", enabled=False)


def test_a_saved_job_is_restored_exactly(tmp_path):
    model, opt, sched, scaler = job(0)
    criterion = criterion_for(model)
    for _ in range(2):  # two steps: momentum, schedule and the sampling step all move
        loss = criterion(model.backbone(torch.randn(3, 1, 2, 2)), torch.tensor([0, 3, 4]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    state = LoopState(epoch=1, step=2, best_metric=0.5, best_record={"epoch": 1})
    payload = checkpoint_payload(
        sharded_state.model_state_dict(model),
        sharded_state.optimizer_state_dict(opt, model),
        sched,
        scaler,
        state,
        CONFIG,
        DATA,
        criterion.checkpoint_entries(),
    )
    assert payload["data"] == {"in_channels": 1, "image_size": 2, "num_classes": 5}
    assert payload["partial_fc"] == {"step": 2} and payload["config"]["seed"] == 0
    assert save_checkpoints(payload, tmp_path, is_best=False) == tmp_path / "last.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # best.pt only for the best epoch
    expected_draw = (random.random(), torch.rand(1))  # the generators as the checkpoint saved them
    restored, opt2, sched2, scaler2 = job(1)
    criterion2 = criterion_for(restored)
    back = load_training_state(tmp_path / "last.pt", restored, opt2, sched2, scaler2, criterion2)
    assert back == state and restored.head.step == 2
    saved, loaded = model.state_dict().values(), restored.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))
    assert sched2.last_epoch == 2 and opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert (random.random(), torch.rand(1)) == expected_draw


def test_a_checkpoint_of_another_model_is_refused_with_every_difference(tmp_path):
    model, opt, sched, scaler = job(0)
    payload = checkpoint_payload(
        sharded_state.model_state_dict(model), opt.state_dict(), sched, scaler, LoopState(), CONFIG, DATA
    )
    save_checkpoints(payload, tmp_path, is_best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    other = MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 6)), AMSoftmaxHead(6, 5), nn.ModuleDict())
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"does not fit this model \(it was trained with .*AMSoftmaxHead\)"):
        load_training_state(
            tmp_path / "best.pt", other, other_opt, torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1.0), scaler
        )


def test_find_checkpoint_lives_with_the_format(tmp_path):
    run = tmp_path / "run"
    (run / checkpoint.CHECKPOINT_DIR).mkdir(parents=True)
    (run / checkpoint.CHECKPOINT_DIR / "last.pt").write_bytes(b"")
    assert find_checkpoint(run) == run / "checkpoints" / "last.pt"
    (run / checkpoint.CHECKPOINT_DIR / "best.pt").write_bytes(b"")
    assert find_checkpoint(run) == run / "checkpoints" / "best.pt"
    with pytest.raises(ConfigError, match="init_from=.*give a checkpoint .pt file or a run directory"):
        find_checkpoint(tmp_path / "nothing", "init_from")
