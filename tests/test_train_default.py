"""The main job: `marginlab train` with no arguments on the embedded digits default."""

from __future__ import annotations

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

GEOMETRY_TAGS = ["train/loss", "train/acc", "train/lr", "test/acc", "test/feature_norm/mean", "test/feature_norm/std",
                 "test/feature_norm/min", "test/feature_norm/max", "test/angle/target_deg",
                 "test/angle/nearest_other_deg", "test/margin/violation_frac", "test/weight_norm/mean",
                 "test/weight_norm/std", "step/loss", "step/feature_norm/mean", "step/angle/target_deg"]


def test_default_run_reaches_95_percent_with_all_artifacts(run_train, metrics):
    code, run_dir = run_train()
    assert code == 0
    summary = metrics[0](run_dir)
    assert summary["status"] == "completed"
    assert summary["test/acc"] >= 0.95
    assert summary["epochs_done"] == 30
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    assert len(metrics[1](run_dir)) == 30
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    missing = [t for t in GEOMETRY_TAGS if t not in acc.Tags()["scalars"]]
    assert not missing, missing
