"""Collapse warnings from the epoch records."""

from __future__ import annotations

from marginlab.collapse import CollapseWatch


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


def test_class_weights_in_one_direction_are_a_collapse():
    watch = CollapseWatch(10, best_angle_deg=36.0)
    (warning,) = watch.check(record(1, min_deg=0.37))
    assert "0.37 deg apart" in warning and "36.00" in warning
    assert CollapseWatch(10, best_angle_deg=10.0).check(record(1, min_deg=0.7)) == []  # 0.7 > 5% of 10 deg


def test_chance_accuracy_while_the_loss_falls_is_flagged_after_three_epochs():
    watch = CollapseWatch(10)
    assert watch.check(record(1, acc=0.1, loss=3.0)) == []
    assert watch.check(record(2, acc=0.11, loss=2.0)) == []
    (warning,) = watch.check(record(3, acc=0.1, loss=1.0))
    assert "since epoch 1" in warning
    assert CollapseWatch(10).check(record(1, acc=0.1)) == []
    flat = CollapseWatch(10)
    assert [flat.check(record(e, acc=0.1, loss=2.0)) for e in (1, 2, 3)] == [[], [], []]  # loss not falling


def test_exploding_feature_norms_and_first_warnings_per_kind():
    watch = CollapseWatch(10)
    watch.check(record(1, norm=5.0))
    assert watch.check(record(2, norm=40.0)) == []
    assert "exploding" in watch.check(record(3, norm=60.0))[0]
    watch.check(record(4, norm=float("nan")))
    assert watch.first_warnings() == ["epoch 3: feature norms exploding: mean 60 (epoch 1: 5)"]
