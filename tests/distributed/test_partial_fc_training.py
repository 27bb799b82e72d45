"""``head.partial_fc.sample_rate`` in the trainer: 2 processes (gloo) train as 1, checkpoints are unsharded."""

from __future__ import annotations

import pytest
import torch

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
    "trainer.grad_clip=1.0",
    "head.partial_fc.sample_rate=1.0",
]


def test_two_shards_train_as_one_and_resume_with_one_process(tmp_path, torchrun):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun.launch(0, one, *RUN)
    torchrun.launch(2, two, *RUN, "trainer.stop_after_epoch=1")
    (run_dir,) = list((two / "runs").iterdir())
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    # the checkpoint is the unsharded model's: every class's weight and momentum, gathered from both ranks
    assert ckpt["model"]["head.weight"].shape == (10, 16)
    assert not any(k.startswith("head.head.") for k in ckpt["model"])
    (momentum,) = [
        s["momentum_buffer"] for s in ckpt["optimizer"]["state"].values() if s["momentum_buffer"].shape == (10, 16)
    ]
    assert momentum.abs().sum(1).gt(0).all()  # no rank's rows left as zero padding
    torchrun.launch(0, two, "resume=latest")  # the 2-shard run continued by 1 process (one shard)
    a, b = torchrun.epochs(one), torchrun.epochs(two)
    assert [r["epoch"] for r in b] == [1, 2]
    assert "train/acc" not in b[0]  # no rank holds all logits: no training accuracy
    # same start (world-size independent init), same global batches, global-norm clipping on every rank
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=1e-3)
    # after a whole epoch the two reduction orders' rounding has grown: 1.1% under AM-Softmax's official init
    # U(+-sqrt(3/D)), under 0.1% with nn.Linear's (which Partial FC used to draw); the epoch's mean loss agrees to 0.1%
    assert b[0]["test/loss"] == pytest.approx(a[0]["test/loss"], rel=2e-2)
    assert b[1]["train/loss"] == pytest.approx(a[1]["train/loss"], rel=1e-2)


def test_sampled_negatives_train_on_two_processes(tmp_path, torchrun):
    torchrun.launch(
        2,
        tmp_path,
        "logger=quiet",
        "trainer.epochs=3",
        "trainer.checkpoint=false",
        "head=arcface",
        "head.s=16",
        "head.m=0.2",
        "head.partial_fc.sample_rate=0.5",
    )
    records = torchrun.epochs(tmp_path)
    assert records[-1]["train/loss"] < records[0]["train/loss"]
    assert records[-1]["test/acc"] > 0.5  # rank 0 evaluates with the gathered, unsharded head
