"""Every head config trains end to end on the digits default: 1 epoch runs and the loss decreases."""

from __future__ import annotations

from pathlib import Path

import pytest

HEADS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "marginlab" / "configs" / "head").glob("*.yaml"))


def test_every_head_is_listed():
    assert {"softmax", "normface", "amsoftmax", "cosface", "arcface", "lsoftmax", "sphereface", "l2softmax", "rbf",
            "combined", "curricularface", "adaface", "magface", "subcenter_arcface"} <= set(HEADS)


@pytest.mark.parametrize("head", HEADS)
def test_head_trains_one_epoch_and_loss_decreases(run_train, metrics, head):
    code, run_dir = run_train(f"head={head}", "logger=quiet", "trainer.epochs=2", "trainer.checkpoint=false",
                              "sched=constant", "optim.lr=0.05")
    assert code == 0
    rows = metrics[1](run_dir)
    assert len(rows) == 2
    assert rows[1]["train/loss"] < rows[0]["train/loss"], rows
    assert rows[1]["train/nonfinite_steps"] == 0
