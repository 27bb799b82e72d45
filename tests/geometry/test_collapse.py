"""Collapse warnings from the epoch records: none for the healthy runs of the shipped digits experiments (real
records, healthy_digits_runs.json), one for a real or synthetic collapse or divergence (issue #23: every healthy
job of digits_2d_comparison used to warn "feature norms exploding" on nearly every epoch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from marginlab.training.collapse import CollapseWatch

#: label -> {verdict, test_acc, best_angle_deg, records}: the epoch records of real runs (seed 0, 15 epochs, the
#: keys the watch reads) of `marginlab reproduce digits_2d_comparison` and of `marginlab train` (the default);
#: verdict "healthy", or what went wrong
RUNS = json.loads((Path(__file__).parent / "healthy_digits_runs.json").read_text())
HEALTHY = sorted(label for label, run in RUNS.items() if run["verdict"] == "healthy")


def record(epoch, acc=0.9, loss=1.0, min_deg=30.0, norm=10.0):
    return {
        "epoch": epoch,
        "test/acc": acc,
        "train/loss": loss,
        "test/weight_angle/min_deg": min_deg,
        "test/feature_norm/mean": norm,
    }


def test_a_healthy_run_gets_no_warning():
    watch = CollapseWatch(10, best_angle_deg=36.0)
    assert [watch.check(record(e, loss=1.0 / e)) for e in range(1, 5)] == [[]] * 4
    assert watch.first_warnings() == []


def test_class_weights_in_one_direction_for_three_epochs_are_a_collapse():
    watch = CollapseWatch(10, best_angle_deg=36.0)
    assert watch.check(record(1, min_deg=0.37)) == watch.check(record(2, min_deg=0.5)) == []
    (warning,) = watch.check(record(3, min_deg=0.4))
    assert "0.40 deg apart" in warning and "36.00" in warning and "since epoch 1" in warning
    assert CollapseWatch(10, best_angle_deg=10.0).check(record(1, min_deg=0.7)) == []  # 0.7 > 5% of 10 deg


def test_a_fresh_head_passing_through_one_direction_is_no_collapse():
    """A 2-D head's random weights often start (or pass) within a degree of each other and then spread."""
    watch = CollapseWatch(10, best_angle_deg=36.0)
    angles = [0.5, 0.2, 12.0, 0.3, 0.6, 20.0, 30.0]
    assert [watch.check(record(e, min_deg=a)) for e, a in enumerate(angles, 1)] == [[]] * len(angles)


def test_chance_accuracy_while_the_loss_falls_is_flagged_after_three_epochs():
    watch = CollapseWatch(10)
    assert watch.check(record(1, acc=0.1, loss=3.0)) == []
    assert watch.check(record(2, acc=0.11, loss=2.0)) == []
    (warning,) = watch.check(record(3, acc=0.1, loss=1.0))
    assert "since epoch 1" in warning
    assert CollapseWatch(10).check(record(1, acc=0.1)) == []
    flat = CollapseWatch(10)
    assert [flat.check(record(e, acc=0.1, loss=2.0)) for e in (1, 2, 3)] == [[], [], []]  # loss not falling


def test_feature_norms_growing_while_the_loss_falls_are_healthy():
    """What every healthy digits run does: the norm grows 10-30x from a fresh net's tiny first value."""
    watch = CollapseWatch(10)
    norms, losses = [0.33, 3.0, 6.0, 9.0, 10.0, 10.5], [2.0, 1.0, 0.5, 0.3, 0.2, 0.21]
    assert [watch.check(record(e, norm=n, loss=lo)) for e, (n, lo) in enumerate(zip(norms, losses), 1)] == [[]] * 6


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_feature_norms_are_exploding(bad):
    watch = CollapseWatch(10)
    assert watch.check(record(1, norm=0.5)) == []
    (warning,) = watch.check(record(2, norm=bad, loss=0.9))
    assert warning == f"feature norms exploding: mean {bad} (not finite)"


def test_feature_norms_blowing_up_while_the_loss_rises_are_exploding_and_first_warnings_per_kind():
    watch = CollapseWatch(10)
    watch.check(record(1, norm=0.3, loss=2.0))
    watch.check(record(2, norm=5.0, loss=0.5))  # the lowest loss so far: the baseline
    assert watch.check(record(3, norm=40.0, loss=0.6)) == []  # 8x
    (warning,) = watch.check(record(4, norm=60.0, loss=0.8))
    assert warning == "feature norms exploding: mean 60, 12x epoch 2's 5 while train/loss rose 0.5 -> 0.8"
    watch.check(record(5, norm=float("nan")))
    assert watch.first_warnings() == [f"epoch 4: {warning}"]


@pytest.mark.parametrize(
    "label", HEALTHY, ids=[label.replace("experiment=digits_2d_comparison ", "") for label in HEALTHY]
)
def test_the_healthy_runs_of_the_shipped_digits_experiments_raise_no_warning(label):
    run = RUNS[label]
    watch = CollapseWatch(10, best_angle_deg=run["best_angle_deg"])
    warnings = {r["epoch"]: w for r in run["records"] if (w := watch.check(dict(r)))}
    assert warnings == {}, f"{label} (test/acc {run['test_acc']}): {warnings}"


def test_a_real_collapse_still_warns():
    """L-Softmax (m 4) on the 2-D digits: class 0's weight ends 0.47 deg from class 3's, shorter, so class 0 is
    never predicted (0 of its test digits right, test/acc 0.87): a collapse, flagged once it lasts."""
    (label,) = [label for label, run in RUNS.items() if run["verdict"] != "healthy"]
    run = RUNS[label]
    watch = CollapseWatch(10, best_angle_deg=run["best_angle_deg"])
    for r in run["records"]:
        watch.check(dict(r))
    (first,) = watch.first_warnings()
    assert first.startswith("epoch 14: collapse: two class weights are 0.43 deg apart") and "since epoch 12" in first


def test_a_blow_up_grafted_onto_a_healthy_run_warns():
    """A healthy run's records, then its norm and loss climbing as a run that diverges: warned within an epoch
    of the norm passing 10x its value at the lowest loss."""
    run = RUNS[HEALTHY[0]]
    records = [dict(r) for r in run["records"]]
    low = min(records, key=lambda r: r["train/loss"])
    for i, factor in enumerate((3.0, 12.0, math.inf), 1):
        records.append(
            {
                **records[-1],
                "epoch": records[-1]["epoch"] + 1,
                "train/loss": low["train/loss"] * (1 + i),
                "test/feature_norm/mean": low["test/feature_norm/mean"] * factor,
            }
        )
    watch = CollapseWatch(10, best_angle_deg=run["best_angle_deg"])
    warned = [r["epoch"] for r in records if watch.check(r)]
    assert warned == [records[-2]["epoch"], records[-1]["epoch"]]
