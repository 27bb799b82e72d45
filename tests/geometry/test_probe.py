"""The geometry probe: bounded sample, epoch statistics, npz, figures, TensorBoard histograms; never fails a run."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from marginlab.commands.cli import main
from marginlab.geometry.probe import GeometryProbe
from marginlab.geometry.store import list_epochs, load_epoch
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.softmax import SoftmaxHead
from marginlab.logging import RunLog

FAST = ["backbone.embedding_dim=2", "trainer.epochs=2", "trainer.checkpoint=false", "logger.progress=false"]
HISTOGRAMS = [
    "geometry/feature_norm_correct",
    "geometry/target_deg",
    "geometry/nearest_other_deg",
    "geometry/margin_deg",
    "geometry/weight_norm",
]
SCALARS = [
    "test/weight_angle/min_deg",
    "test/weight_angle/mean_deg",
    "test/class_angle/intra_deg",
    "test/class_angle/inter_min_deg",
    "test/class_angle/inter_mean_deg",
    "test/angle/margin_deg",
    "test/probe/seconds",
]


def feed(probe, head, batches=3, batch=50, dim=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        feats = torch.randn(batch, dim, generator=gen)
        labels = torch.randint(0, head.num_classes, (batch,), generator=gen)
        logits = head(feats)
        if probe.wants_more:
            probe.collect(feats, head.cosine(feats), labels, logits.argmax(1), torch.randn(batch, 1, 8, 8))


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1024, path
    with Image.open(path) as img:
        assert img.format == "PNG"


def test_probe_keeps_a_bounded_sample_and_saves_what_redraws_it(tmp_path):
    head = AMSoftmaxHead(2, 4)
    probe = GeometryProbe(tmp_path, max_samples=120)
    for epoch in (1, 2):
        feed(probe, head, seed=epoch)
        stats = probe.end_epoch(epoch, step=10 * epoch, head=head)
        assert {
            "weight_angle/min_deg",
            "class_angle/intra_deg",
            "class_angle/inter_min_deg",
            "angle/margin_deg",
            "probe/seconds",
        } <= set(stats)
        assert 0.0 <= stats["weight_angle/min_deg"] <= stats["weight_angle/mean_deg"] <= 180.0
    probe.end_run(step=20)
    assert [p.name for p in list_epochs(tmp_path)] == ["epoch_001.npz", "epoch_002.npz"]
    data = load_epoch(list_epochs(tmp_path)[-1])
    assert data["features"].shape == (120, 2) and data["labels"].shape == (120,)  # bounded: 150 fed
    assert data["weights"].shape == (4, 2) and data["normalized"] and data["head"] == "AMSoftmaxHead"
    assert np.all((data["target_deg"] >= 0) & (data["target_deg"] <= 180))
    for name in ("features_epoch_001.png", "features_epoch_002.png", "features_final.png", "target_angles.png"):
        assert_png(tmp_path / "figures" / name)


def test_high_dimensional_features_are_not_saved_or_drawn(tmp_path):
    head = SoftmaxHead(16, 5)
    probe = GeometryProbe(tmp_path, max_samples=64)
    feed(probe, head, dim=16)
    probe.end_epoch(1, step=1, head=head)
    probe.end_run(step=1)
    data = load_epoch(list_epochs(tmp_path)[0])
    assert "features" not in data and data["target_deg"].shape == (64,)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["target_angles.png"]


def test_probe_without_figures_draws_nothing(tmp_path):
    head = AMSoftmaxHead(2, 3)
    probe = GeometryProbe(tmp_path, max_samples=64, figures=False)
    feed(probe, head)
    probe.end_epoch(1, step=1, head=head)
    probe.end_run(step=1)
    assert list_epochs(tmp_path) and not (tmp_path / "figures").exists()


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory):
    """One 2-epoch run of the digits default with a 2-D embedding, shared by the checks below."""
    out = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINLAB_OUTPUT_DIR", str(out))
        assert main(["train", *FAST]) == 0
    (run_dir,) = (out / "runs").iterdir()
    return run_dir


def test_run_draws_per_epoch_scatter_final_and_target_angles(run_2d):
    names = sorted(p.name for p in (run_2d / "figures").iterdir())
    assert names == ["features_epoch_001.png", "features_epoch_002.png", "features_final.png", "target_angles.png"]
    for name in names:
        assert_png(run_2d / "figures" / name)
    assert len(list_epochs(run_2d)) == 2
    assert sum(p.stat().st_size for p in (run_2d / "geometry").iterdir()) < 200_000  # bounded


def test_run_logs_histograms_images_scalars_and_projector(run_2d, metrics):
    (events,) = (run_2d / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    missing = [t for t in HISTOGRAMS if t not in tags["histograms"]] + [t for t in SCALARS if t not in tags["scalars"]]
    assert not missing, missing
    assert len(acc.Histograms("geometry/target_deg")) == 2  # one per epoch
    assert {"figures/features", "figures/features_final", "figures/target_angles"} <= set(tags["images"])
    assert (run_2d / "tensorboard" / "projector_config.pbtxt").is_file()
    (projector,) = (run_2d / "tensorboard").glob("*/val_features")
    assert (projector / "sprite.png").is_file() and len((projector / "tensors.tsv").read_text().splitlines()) == 360
    last = metrics[1](run_2d)[-1]
    assert all(k in last for k in SCALARS)


def test_a_failing_figure_does_not_fail_the_run(run_train, metrics, monkeypatch):
    import marginlab.figures.features

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(marginlab.figures.features, "features_figure", broken)
    code, run_dir = run_train(*FAST, "trainer.epochs=1", "logger.tensorboard=false")
    assert code == 0 and metrics[0](run_dir)["status"] == "completed"
    log = (run_dir / "train.log").read_text()  # Hydra's job log: the probe's warnings land there
    assert "WARNING" in log and "figure features_epoch_001.png not drawn: RuntimeError: boom" in log
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == ["target_angles.png"]


def test_a_failing_figure_is_a_warning_in_the_probe(tmp_path, monkeypatch, caplog):
    import marginlab.figures.angles

    monkeypatch.setattr(marginlab.figures.angles, "target_angle_figure", lambda *a, **k: 1 / 0)
    head = AMSoftmaxHead(2, 3)
    probe = GeometryProbe(tmp_path, max_samples=32)
    feed(probe, head)
    probe.end_epoch(1, step=1, head=head)
    with caplog.at_level(logging.WARNING, logger="marginlab.geometry.figure_pool"):
        probe.end_run(step=1)
    assert any("target_angles.png not drawn: ZeroDivisionError" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "figures" / "features_final.png").is_file()


def test_non_finite_features_do_not_break_the_probe(tmp_path):
    log = RunLog(tmp_path, tensorboard=True)
    head = AMSoftmaxHead(2, 3)
    probe = GeometryProbe(tmp_path, max_samples=64, writer=log.writer)
    feats = torch.randn(32, 2)
    feats[0] = float("nan")
    probe.collect(feats, head.cosine(feats), torch.randint(0, 3, (32,)), torch.zeros(32, dtype=torch.long))
    assert "weight_angle/min_deg" in probe.end_epoch(1, step=1, head=head)
    probe.end_run(step=1)
    log.close()
