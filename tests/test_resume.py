"""resume=: 2 epochs straight == 1 epoch + resume 1 epoch, bit for bit, in the run's own directory."""

from __future__ import annotations

import pytest
import torch

import marginlab.training.train

RUN = ["logger=quiet", "trainer.epochs=2", "sched=cosine", "head=arcface", "m=0.3"]
#: timings differ run to run; the environment is in each invocation's first record (environment.py)
TIMES = ("train/images_per_s", "test/probe/seconds", "time/epoch_s", "environment")


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_run(straight, split, metrics) -> list[dict]:
    """The run trained straight and the one stopped after epoch 1 and resumed hold the same weights (state
    included) and per-epoch records, timings aside; returns the straight run's records."""
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = metrics[1](straight), metrics[1](split)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in TIMES} == {k: v for k, v in rb.items() if k not in TIMES}
    return rows_a


@pytest.mark.parametrize("extra", [[], ["head.partial_fc.sample_rate=0.5"]], ids=["plain", "partial_fc"])
def test_resume_continues_exactly(run_train, metrics, outputs_dir, tmp_path, monkeypatch, extra):
    code, straight = run_train(*RUN, *extra)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    code, split = run_train(*RUN, *extra, "trainer.stop_after_epoch=1")
    split = next((tmp_path / "second" / "runs").iterdir())
    assert code == 0 and metrics[0](split)["status"] == "stopped"
    code, _ = run_train("resume=latest")
    assert code == 0
    assert len(list((tmp_path / "second" / "runs").iterdir())) == 1  # continued in its own directory
    assert_same_run(straight, split, metrics)
    assert metrics[0](split)["status"] == "completed"


def test_resume_by_checkpoint_path_and_extended_epochs(run_train, metrics):
    code, run_dir = run_train("logger=quiet", "trainer.epochs=1", "sched=constant")
    assert code == 0
    code, again = run_train(f"resume={run_dir / 'checkpoints' / 'last.pt'}", "trainer.epochs=2")
    assert code == 0 and again == run_dir
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2]


def test_a_checkpoint_written_before_the_training_package_resumes(run_train, metrics):
    """Its config names the schedule at its old path (marginlab.schedules, before issue #26 moved it)."""
    code, run_dir = run_train("logger=quiet", "trainer.epochs=1", "sched=constant")
    assert code == 0
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["sched"]["_target_"] = "marginlab.schedules.ConstantSchedule"
    torch.save(ckpt, last)
    code, again = run_train(f"resume={last}", "trainer.epochs=2")
    assert code == 0 and again == run_dir
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2]


def test_resume_latest_without_runs_is_a_clear_error(run_train, capfd):
    code, _ = run_train("resume=latest")
    assert code == 2 and "resume=latest: no run with a checkpoint" in capfd.readouterr().err


def test_finished_line_leaves_out_missing_metrics_without_empty_parts():
    from marginlab.training.finished_line import finished_line

    bare = {"status": "completed", "epochs_done": 3, "wall_time_s": 1.25, "best/val/acc": float("-inf")}
    line = finished_line(bare, 3, "val/acc", "/runs/r")
    assert line == "marginlab: completed 3/3 epochs in 1.2 s; /runs/r"  # no "; ;" for what the run did not measure
    full = {**bare, "test/acc": 0.5, "test/loss": float("nan"), "best/val/acc": 0.75, "best/epoch": 2}
    assert finished_line(full, 3, "val/acc", "/runs/r") == (
        "marginlab: completed 3/3 epochs in 1.2 s; test/acc 0.5000, "
        "test/loss nan, best/val/acc 0.7500; best.pt: epoch 2 "
        "(best val/acc); /runs/r"
    )


def test_ctrl_c_records_the_run_as_interrupted_and_resume_continues_exactly(
    run_train, metrics, tmp_path, monkeypatch, capfd
):
    """Ctrl-C in epoch 2: one line (exit 130) saying how to go on, metrics.json "interrupted" after 1 epoch; the
    resume then gives the weights and records of 2 epochs straight."""
    code, straight = run_train(*RUN)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    epoch = marginlab.training.train.train_one_epoch
    calls = []

    def ctrl_c_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return epoch(*args, **kwargs)

    monkeypatch.setattr(marginlab.training.train, "train_one_epoch", ctrl_c_in_epoch_2)
    capfd.readouterr()
    code, _ = run_train(*RUN)
    split = next((tmp_path / "second" / "runs").iterdir())
    err = capfd.readouterr().err
    assert code == 130 and err == f"marginlab: interrupted after 1/2 epochs; resume={split} continues it\n", err
    summary = metrics[0](split)
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 1 and "best/test/acc" in summary
    monkeypatch.setattr(marginlab.training.train, "train_one_epoch", epoch)
    code, _ = run_train("resume=latest")
    assert code == 0 and metrics[0](split)["status"] == "completed"
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[key], b[key]) for key in a)
    rows_a, rows_b = metrics[1](straight), metrics[1](split)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in TIMES} == {k: v for k, v in rb.items() if k not in TIMES}


def test_resume_keeps_the_runs_length_when_the_default_changed_since(run_train, metrics):
    """A run begun when its epochs were a default (since then a dataset may pick its own: configs/dataset/) goes on
    to the length its checkpoint was trained for, not to what the same command line composes to today."""
    code, run_dir = run_train("logger=quiet", "trainer.epochs=2", "sched=constant", "trainer.stop_after_epoch=1")
    assert code == 0
    overrides = run_dir / ".hydra" / "overrides.yaml"
    overrides.write_text(overrides.read_text().replace("- trainer.epochs=2\n", ""))  # as if 2 had been the default
    code, _ = run_train("resume=latest")
    assert code == 0
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2] and metrics[0](run_dir)["status"] == "completed"
