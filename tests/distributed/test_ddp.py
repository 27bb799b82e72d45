"""Data-parallel training with torchrun on CPU (gloo, 2 processes): the same loss curve as 1 process."""

from __future__ import annotations

import pytest

# no BatchNorm: per-rank batch statistics would differ from the single process's by design
RUN = [
    "logger=quiet",
    "trainer.epochs=2",
    "backbone=lenet_pp",
    "backbone.batch_norm=false",
    "backbone.embedding_dim=16",
    "head=amsoftmax",
    "dataset.batch_size=64",
    "sched=constant",
    "optim.lr=0.05",
]


def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path, torchrun):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun.launch(1, one, *RUN)
    torchrun.launch(2, two, *RUN, "trainer.stop_after_epoch=1")
    assert len(list((two / "runs").iterdir())) == 1  # only rank 0 made a run directory
    torchrun.launch(0, two, "resume=latest")  # resume the 2-process run with 1 process (a different world size)
    a, b = torchrun.epochs(one), torchrun.epochs(two)
    assert [r["epoch"] for r in b] == [1, 2]
    # epoch 1: same global batches, gradients averaged over ranks == the single process's gradient
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=2e-3)
    assert b[0]["test/acc"] == pytest.approx(a[0]["test/acc"], abs=0.02)
    assert b[1]["train/loss"] == pytest.approx(a[1]["train/loss"], rel=5e-2)
