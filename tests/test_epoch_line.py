"""One line per epoch on stdout, terminal or not, and in the run's train.log."""

from __future__ import annotations

import sys

from marginlab.logging.epoch_line import format_epoch_line

FAST = [
    "trainer.epochs=2",
    "trainer.checkpoint=false",
    "logger.tensorboard=false",
    "logger.figures=false",
    "logger.progress=false",
    "logger.probe_max_samples=64",
]


def epoch_lines(text: str) -> list[str]:
    return [line[line.index("epoch ") :] for line in text.splitlines() if "epoch " in line and "img/s" in line]


def test_line_holds_the_headline_numbers_verification_sets_and_warnings():
    record = {
        "epoch": 3,
        "train/loss": 0.41234,
        "train/acc": 0.953,
        "test/acc": 0.9667,
        "train/lr": 0.0976,
        "test/feature_norm/mean": 21.3,
        "test/angle/target_deg": 31.24,
        "test/margin/violation_frac": 0.041,
        "lfw/acc": 0.98123,
        "lfw/auc": 0.99,
        "train/images_per_s": 1234.4,
        "time/epoch_s": 2.06,
    }
    line = format_epoch_line(record, 30, ["collapse: x"])
    assert line == (
        "epoch 3/30  loss 0.4123  acc 0.9530  test/acc 0.9667  lr 0.0976  norm 21.3  theta_y 31.2deg  "
        "viol 0.041  lfw/acc 0.9812  1234 img/s  2.1 s  WARNING collapse: x"
    )
    # an epoch without evaluation shows what it has
    assert format_epoch_line({"epoch": 1, "train/loss": 1.0}, 2) == "epoch 1/2  loss 1.0000"


def test_every_epoch_prints_a_line_without_a_terminal_and_writes_it_to_train_log(run_train, capsys):
    assert not sys.stdout.isatty()  # pytest's capture: what SLURM, nohup and `> log` give
    code, run_dir = run_train(*FAST)
    assert code == 0
    printed = epoch_lines(capsys.readouterr().out)
    assert [line.split()[1] for line in printed] == ["1/2", "2/2"]
    assert all("loss " in line and "test/acc " in line and "norm " in line and "viol " in line for line in printed)
    assert epoch_lines((run_dir / "train.log").read_text()) == printed


def test_quiet_keeps_the_line_off_the_console_but_in_train_log(run_train, capsys):
    code, run_dir = run_train("logger=quiet", "trainer.epochs=1", "trainer.checkpoint=false")
    assert code == 0
    assert epoch_lines(capsys.readouterr().out) == []
    assert [line.split()[1] for line in epoch_lines((run_dir / "train.log").read_text())] == ["1/1"]
