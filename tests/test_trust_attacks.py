"""Attacks on the trust guarantees (checkpoints run no code, no run destroys another, "completed" means trained,
exact resume) that an earlier round left open: each test failed before its fix."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import yaml

from marginlab import run_dirs
from marginlab.errors import ConfigError, DataError, OutputError
from marginlab.report import build_report, collect, read_job
from marginlab.training import checkpoint

from .conftest import run_cli, snapshot

FAST = ["logger=quiet", "sched=constant", "trainer.epochs=1"]


# ---------------------------------------------------------------- checkpoints
def test_save_flushes_the_directory_after_the_rename(tmp_path, monkeypatch):
    # without the directory's fsync a power loss can undo the rename: last.pt would be the previous epoch's
    synced = []
    real = os.fsync

    def fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append((is_dir, (tmp_path / "last.pt").exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoint.save_atomic({"x": torch.zeros(1)}, tmp_path / "last.pt")
    assert synced == [(False, False), (True, True)]  # the file before the rename, the directory after it


def test_a_tensor_declaring_more_elements_than_the_file_holds_is_refused(tmp_path):
    # a 4-byte storage viewed as 10^12 elements: whoever copies it (np.random.set_state's key) allocates 4 TB
    bomb = torch.zeros(1).expand(10**12)
    torch.save({"model": {}, "config": {}, "data": {}, "rng": {"numpy": {"key": bomb}}}, tmp_path / "bomb.pt")
    assert (tmp_path / "bomb.pt").stat().st_size < 4096
    with pytest.raises(DataError, match=r"bomb\.pt: not a loadable checkpoint: tensor rng\.numpy\.key declares"):
        checkpoint.read_checkpoint(tmp_path / "bomb.pt")


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_a_tensor_without_checked_data_is_refused(tmp_path, kind):
    # sparse: torch skips its index checks on load (out-of-range indices are memory errors); meta: no data at all
    if kind == "sparse":
        tensor = torch.sparse_coo_tensor(torch.tensor([[0, 10**9]]), torch.ones(2), (10**12,), check_invariants=False)
    else:
        tensor = torch.empty(10, device="meta")
    torch.save({"model": {"w": tensor}}, tmp_path / "t.pt")
    with pytest.raises(DataError, match=rf"t\.pt: not a loadable checkpoint: tensor model\.w is a (torch\.)?{kind}"):
        checkpoint.read_checkpoint(tmp_path / "t.pt", required=())


def nested_mkdir(target: Path) -> dict:
    """A checkpoint config whose backbone argument is itself a ``_target_``: instantiate calls it, making ``target``."""
    path = {"_target_": "pathlib.Path", "_args_": [str(target)]}
    return {
        "_target_": "marginlab.backbones.plain_cnn.PlainCNN",
        "embedding_dim": {"_target_": "pathlib.Path.mkdir", "_args_": [path]},
    }


@pytest.mark.parametrize(
    "backbone, reason",
    [
        ("mkdir", "names _target_='pathlib.Path.mkdir'; a file may name only a marginlab backbone"),
        ({"_target_": "shutil.rmtree", "path": "x"}, "names _target_='shutil.rmtree'"),
        ({"_target_": "marginlab.backbones.plain_cnn.PlainCNN", "conv0": "${unique_dir:x}"}, "an interpolation"),
        (None, "no backbone config"),
    ],
)
def test_a_checkpoint_config_never_chooses_what_code_runs(tmp_path, backbone, reason):
    # eval, export and embed build the backbone its config names (hydra.utils.instantiate runs any callable)
    from marginlab.training.weights import load_backbone

    made = tmp_path / "made_by_the_checkpoint"
    config = {"backbone": nested_mkdir(made) if backbone == "mkdir" else backbone}
    torch.save({"model": {}, "config": config, "data": {"in_channels": 1, "image_size": 8}}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match=rf"evil\.pt: .*{reason}"):
        load_backbone(tmp_path / "evil.pt")
    assert not made.exists()


def test_a_checkpoint_config_asking_for_a_huge_backbone_is_refused_before_it_is_built(tmp_path, monkeypatch):
    # a 1 KB file whose config asks for wide layers (4096 channels: 600 MB) is refused on the shapes alone,
    # built on the meta device (no memory); here 256 channels keep the test fast
    from marginlab.backbones.plain_cnn import PlainCNN
    from marginlab.training.weights import load_backbone

    built_on, init = [], PlainCNN.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built_on.append(next(self.parameters()).device.type)

    monkeypatch.setattr(PlainCNN, "__init__", recording_init)
    wide = {"_target_": "marginlab.backbones.plain_cnn.PlainCNN", "stages": [[256, 1]], "conv0": 256}
    torch.save(
        {"model": {}, "config": {"backbone": wide}, "data": {"in_channels": 1, "image_size": 8}}, tmp_path / "h.pt"
    )
    with pytest.raises(ConfigError, match=r"h\.pt: its weights do not fit the backbone its config builds"):
        load_backbone(tmp_path / "h.pt")
    assert built_on == ["meta"]


def test_an_export_sidecar_asking_for_a_huge_backbone_is_refused_before_it_is_built(tmp_path, monkeypatch):
    # a 0.1 MB state dict whose export sidecar asks for an IResNet with a 10^6-wide embedding (a 100 GB layer):
    # built for real, it took 2.5 GB at a 25000-wide one; the meta device's shapes refuse it, allocating nothing
    from marginlab.backbones.iresnet import IResNet
    from marginlab.training.weights import load_backbone

    built_on, init = [], IResNet.__init__

    def guarded_init(self, *args, **kwargs):
        built_on.append(torch.get_default_device().type)
        assert built_on[-1] == "meta", "built for real before its shapes were checked"
        init(self, *args, **kwargs)

    monkeypatch.setattr(IResNet, "__init__", guarded_init)
    weights = tmp_path / "tiny.state_dict.pt"
    torch.save({"w": torch.zeros(25000)}, weights)
    huge = {"_target_": "marginlab.backbones.iresnet.IResNet", "depth": 18, "embedding_dim": 10**6}
    card = {"backbone": huge, "input": {"channels": 3, "height": 112, "width": 112}}
    Path(f"{weights}.json").write_text(json.dumps(card))
    with pytest.raises(ConfigError, match=r"tiny\.state_dict\.pt does not fit the backbone of tiny\.state_dict"):
        load_backbone(weights)
    assert built_on == ["meta"]


def test_a_legacy_format_checkpoint_is_read_where_resume_maps_it(tmp_path):
    # check_resume reads with mmap=True, which torch refuses for its pre-1.6 (non-zip) format
    torch.save({"state": {"epoch": 1}}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert checkpoint.read_checkpoint(tmp_path / "old.pt", ("state",), mmap=True)["state"] == {"epoch": 1}


def test_a_partial_last_epoch_record_does_not_stop_the_resume(tmp_path):
    # a kill while appending to metrics.jsonl leaves half a line; resuming must drop it, not crash on it
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "test/a')
    checkpoint.trim_epoch_records(path, 2)
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    path.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')  # damage elsewhere: one line naming it
    with pytest.raises(DataError, match=r"metrics\.jsonl: line 2 is not a JSON epoch record"):
        checkpoint.trim_epoch_records(path, 2)


# ---------------------------------------------------------------- no run over another
def fake_run(run_dir: Path) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=7\n")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"the other run's weights")
    (run_dir / "metrics.json").write_text('{"status": "completed"}\n')
    (run_dir / "train.log").write_text("epoch 1/1 ...\n")  # Hydra's log handler opens it (appending) before the claim
    return run_dir


def test_a_new_run_never_writes_into_a_directory_that_holds_another_run(tmp_path, capfd):
    other = fake_run(tmp_path / "other")
    before = snapshot(other)
    assert run_cli("train", *FAST, f"hydra.run.dir={other}") == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"hydra.run.dir={other} already holds a run" in err[0], err
    assert f"resume={other}" in err[0]
    assert snapshot(other) == before


def test_two_runs_claiming_one_directory_get_it_once(tmp_path):
    assert run_dirs.claim_output_subdir(tmp_path / "run", ".hydra") == ".hydra"
    with pytest.raises(OutputError, match="already holds a run"):
        run_dirs.claim_output_subdir(tmp_path / "run", ".hydra")


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path, monkeypatch, capfd):
    # resume=latest of a run still training (or one resume started twice) must not train into it alongside
    import marginlab.training.train as train_module

    trained = []
    monkeypatch.setattr(train_module, "train", lambda cfg, run_dir: trained.append(run_dir))
    busy = tmp_path / "busy"
    busy.mkdir()
    other_process = run_dirs.RunLock(busy)
    try:
        with pytest.raises(OutputError, match="being trained by another process"):
            run_dirs.RunLock(busy)
        assert run_cli("train", *FAST, f"hydra.run.dir={busy}") == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being trained by another process now" in err[0], err
        assert trained == [] and not (busy / "metrics.json").exists()
    finally:
        other_process.release()
    run_dirs.RunLock(busy).release()  # free again once the other process ends (or dies)


def test_a_resume_from_a_checkpoint_behind_last_pt_is_refused(tmp_path):
    # resume=<run>/checkpoints/best.pt of a run whose last.pt is further on would train those epochs again over it
    from marginlab.errors import ConfigError
    from marginlab.training.resume import expand_resume

    run = fake_run(tmp_path / "run")
    torch.save({"state": {"epoch": 3}}, run / "checkpoints" / "last.pt")
    torch.save({"state": {"epoch": 1}}, run / "checkpoints" / "best.pt")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"last\.pt is at epoch 3, ahead of this checkpoint's 1.* resume="):
        expand_resume([f"resume={run / 'checkpoints' / 'best.pt'}"])
    assert snapshot(run) == before


def test_a_half_written_resume_history_is_one_line_not_a_traceback(tmp_path):
    # a kill while recording a resume left half an entry: the next resume says which file, not a KeyError
    from marginlab.errors import ConfigError
    from marginlab.training.resume import expand_resume

    run = fake_run(tmp_path / "run")
    for partial in ("- time: '2026-12-02 13:40:00'\n  from_epoch: 6\n  overr", "- time: 'x'\n  from_epoch: 6\n"):
        (run / ".hydra" / "resumes.yaml").write_text(partial)
        with pytest.raises(ConfigError, match=r"resumes\.yaml: not a resume history"):
            expand_resume([f"resume={run}"])


# ---------------------------------------------------------------- "completed" means trained
def test_a_resume_killed_midway_is_not_reported_as_the_earlier_completed_run(tmp_path):
    # a completed 2-epoch run resumed to 4 epochs, killed in epoch 3: its old "completed" must not stand
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "epochs_done": 2, "test/acc": 0.6}))
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    checkpoint.prepare_resumed_run(run, 2)
    assert read_job(run).status != "completed"


def test_a_completed_summary_short_of_its_config_epochs_is_not_averaged(tmp_path):
    # the same run left by an earlier release (its old summary kept): config.yaml says 4 epochs, metrics.json 2
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": 0, "trainer": {"epochs": 4}}))
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "epochs_done": 2, "test/acc": 0.6}))
    assert read_job(run).status == "stopped"
    (run / "metrics.json").write_text(json.dumps({"status": "completed", "epochs_done": 4, "test/acc": 0.6}))
    assert read_job(run).status == "completed"


def report_job(root: Path, name: str, seed: int, metrics, overrides=(), resumed=None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "m": 0.3}))
    if resumed is not None:
        entry = {"time": "t", "from_epoch": 2, "overrides": [*resumed, f"seed={seed}"]}
        (job / ".hydra" / "resumes.yaml").write_text(yaml.safe_dump([entry]))
    (job / "metrics.json").write_text(metrics if isinstance(metrics, str) else json.dumps(metrics))
    return job


def done(acc: float) -> dict:
    return {"status": "completed", "test/acc": acc}


def test_a_resumed_run_is_labelled_by_what_it_trained_with(tmp_path):
    report_job(tmp_path, "a", 0, done(0.9), ["trainer.epochs=2"], resumed=["trainer.epochs=4"])
    report_job(tmp_path, "b", 1, done(0.5), ["trainer.epochs=2"])
    report = build_report(collect([tmp_path]), root=tmp_path)
    assert {r.setting["trainer.epochs"]: len(r.completed) for r in report.rows} == {"4": 1, "2": 1}


def test_a_setting_changed_on_resume_is_marked(tmp_path):
    # resume may change trainer.precision (or dataset.decode, ...): the seed trained partly one way, partly the other
    resumed = ["trainer.precision=bf16"]
    report_job(tmp_path, "a", 0, done(0.9), ["trainer.precision=32"], resumed=resumed)
    report_job(tmp_path, "b", 1, done(0.8), ["trainer.precision=bf16"])
    report = build_report(collect([tmp_path]), root=tmp_path)
    assert "changed on resume: a: trainer.precision: 32 -> bf16 (from epoch 2)" in report.notes()
    assert not [n for n in report.notes() if n.startswith("changed on resume: b")]


def test_two_runs_of_one_seed_are_averaged_once_and_named(tmp_path):
    report_job(tmp_path, "a", 0, done(0.9))
    report_job(tmp_path, "copy_of_a", 0, done(0.5))
    report_job(tmp_path, "b", 1, done(0.7))
    report = build_report(collect([tmp_path]), root=tmp_path)
    (row,) = report.rows
    assert len(row.completed) == 2 and row.stats["test/acc"].mean == pytest.approx(0.8)
    assert any(n.startswith("duplicate: copy_of_a repeats seed 0 of a") for n in report.notes()), report.notes()


def test_a_completed_seed_with_a_nan_metric_is_marked_not_silently_dropped(tmp_path):
    report_job(tmp_path, "a", 0, done(0.9))
    report_job(tmp_path, "b", 1, {"status": "completed", "test/acc": None, "nonfinite": {"test/acc": "nan"}})
    report = build_report(collect([tmp_path]), root=tmp_path)
    (row,) = report.rows
    assert report.cells(row)[-1] == "0.9000 (n=1)"
    assert "test/acc of b is nan (not averaged)" in report.notes()


def test_corrupted_job_files_are_a_failed_job_not_a_crash(tmp_path, capsys):
    report_job(tmp_path, "a", 0, done(0.9))
    report_job(tmp_path, "b", 1, "[1, 2]")  # valid JSON, not a record
    report_job(tmp_path, "c", 2, done(0.8))
    (tmp_path / "c" / ".hydra" / "config.yaml").write_text("[1]\n")
    (tmp_path / "c" / ".hydra" / "hydra.yaml").write_text("hydra: [1]\n")
    assert run_cli("report", str(tmp_path)) == 0
    jobs = {j.path.name: j for j in collect([tmp_path])}
    assert jobs["b"].status == "failed" and jobs["c"].status == "completed"
