"""resume= never destroys what a run has: it checks everything first, leaves a completed run alone, refuses a
different model/loss/data or a longer run that would not be exact, and keeps the history of its overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from marginlab.environment import kept_threads
from marginlab.errors import DataError
from marginlab.report.jobs import changed_on_resume
from marginlab.training import builders, resume

from .conftest import read_metrics, snapshot

QUICK = ["logger=quiet", "trainer.epochs=2"]


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture
def finished(run_train):
    """A completed 2-epoch cosine run (its schedule ends at lr 0)."""
    code, run_dir = run_train(*QUICK, "sched=cosine")
    assert code == 0
    return run_dir


@pytest.mark.parametrize(
    "bad",
    [
        ["trainer.precision=fp16"],
        ["head=arcface"],
        ["seed=1"],
        ["optim.lr=0.5"],
        ["head.s=20"],
        ["dataset.batch_size=32"],
        ["head=nope"],
        ["trainer.epochs=1"],
        ["logger.wandb.mode=online"],
        ["trainer.stop_after_epoch=2"],
    ],
)
def test_a_refused_resume_leaves_every_file_byte_identical(run_train, finished, capfd, bad):
    before = snapshot(finished)
    code, _ = run_train("resume=latest", "trainer.epochs=3", *bad)
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "marginlab: error:" in err, err
    assert snapshot(finished) == before
    code, _ = run_train("resume=latest")  # and a plain resume afterwards is not poisoned by the bad one
    assert code == 0 and snapshot(finished) == before


def test_a_different_head_lists_every_differing_key(run_train, finished, capfd):
    code, _ = run_train("resume=latest", "head=arcface")
    err = capfd.readouterr().err
    assert code == 2
    for key in ("head._target_", "head.m: 0.35 -> 0.5", "head.s: 30.0 -> 64.0"):
        assert key in err, err


def test_resuming_a_completed_run_changes_nothing(run_train, finished, capsys):
    before = snapshot(finished)
    code, _ = run_train("resume=latest")
    out = capsys.readouterr().out
    assert code == 0 and "already completed its 2 of 2 epochs: nothing to do" in out
    assert snapshot(finished) == before


def test_a_longer_run_on_an_ended_schedule_is_refused_with_the_way_on(run_train, finished, capfd):
    before = snapshot(finished)
    code, _ = run_train("resume=latest", "trainer.epochs=4")
    err = capfd.readouterr().err
    assert code == 2 and "already ended at lr 0" in err and "start a new run" in err
    assert snapshot(finished) == before


@pytest.mark.parametrize(
    "sched", [["sched=constant"], ["sched=multistep", "sched.milestones=[0.9]"]], ids=["constant", "multistep_fraction"]
)
def test_a_longer_run_is_allowed_when_it_is_exactly_a_run_of_the_new_length(
    run_train, tmp_path, monkeypatch, metrics, sched
):
    """Stopped after 1 of 2 epochs, resumed with 3: the same weights as 3 epochs straight (the schedule's factor
    at every step taken is the same under both lengths; the resumed run follows the new length's schedule)."""
    code, straight = run_train("logger=quiet", "trainer.epochs=3", *sched)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    code, split = run_train(*QUICK, *sched, "trainer.stop_after_epoch=1")
    assert code == 0
    code, _ = run_train("resume=latest", "trainer.epochs=3")
    assert code == 0 and metrics[0](split)["status"] == "completed"
    a, b = weights(straight), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_resume_is_appended_to_the_history_and_the_original_overrides_stay(run_train, metrics):
    code, run_dir = run_train(*QUICK, "sched=constant", "trainer.stop_after_epoch=1")
    original = (run_dir / ".hydra" / "overrides.yaml").read_bytes()
    assert code == 0
    assert run_train("resume=latest", "trainer.stop_after_epoch=2")[0] == 0
    assert run_train("resume=latest", "trainer.epochs=3")[0] == 0
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == original
    history = yaml.safe_load((run_dir / ".hydra" / "resumes.yaml").read_text())
    assert [h["from_epoch"] for h in history] == [1, 2]
    assert "trainer.stop_after_epoch=2" in history[0]["overrides"] and "trainer.epochs=3" in history[1]["overrides"]
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["epochs"] == 3
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2, 3]
    before = snapshot(run_dir)
    assert run_train("resume=latest")[0] == 0  # the newest overrides (3 epochs) are the run's: nothing to do
    assert snapshot(run_dir) == before


def test_a_resume_that_fails_while_setting_up_leaves_the_run_as_it_was(run_train, finished, monkeypatch, capfd):
    code, run_dir = run_train(*QUICK, "sched=constant", "trainer.stop_after_epoch=1")
    assert code == 0
    before = snapshot(run_dir)

    def missing(cfg):
        raise DataError("dataset.root='/gone' does not exist")

    monkeypatch.setattr(builders, "build_data", missing)
    code, _ = run_train(f"resume={run_dir}")
    assert code == 2 and "dataset.root='/gone' does not exist" in capfd.readouterr().err
    assert snapshot(run_dir) == before


def test_ctrl_c_before_a_resume_trains_leaves_the_run_as_it_was(run_train, monkeypatch, capfd):
    code, run_dir = run_train(*QUICK, "sched=constant", "trainer.stop_after_epoch=1")
    assert code == 0
    before = snapshot(run_dir)

    def ctrl_c(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(builders, "build_data", ctrl_c)
    capfd.readouterr()
    code, _ = run_train(f"resume={run_dir}")
    assert code == 130 and capfd.readouterr().err == f"marginlab: interrupted; resume={run_dir} continues it\n"
    assert snapshot(run_dir) == before


def test_a_run_saved_before_later_keys_resumes_with_the_values_that_reproduce_it(run_train, capfd):
    """A checkpoint written before dataset.val_fraction / trainer.best_on / head.init / trainer.num_threads /
    trainer.freeze_batchnorm existed: resuming it with
    today's defaults would change its data, so it is refused naming the keys; with the old values it goes on."""
    from marginlab.training.checkpoint import read_checkpoint

    code, run_dir = run_train(
        *QUICK, "sched=constant", "trainer.stop_after_epoch=1", "dataset.val_fraction=0", "trainer.best_on=test"
    )
    assert code == 0
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = read_checkpoint(path)
    for group, key in (
        ("dataset", "val_fraction"),
        ("trainer", "best_on"),
        ("head", "init"),
        ("trainer", "num_threads"),
        ("trainer", "freeze_batchnorm"),
    ):
        del ckpt["config"][group][key]
    torch.save(ckpt, path)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    overrides.write_text(
        yaml.safe_dump(
            [
                o
                for o in yaml.safe_load(overrides.read_text())
                if not o.startswith(("dataset.val_fraction", "trainer.best_on"))
            ]
        )
    )
    before = snapshot(run_dir)
    code, _ = run_train("resume=latest")
    err = capfd.readouterr().err
    assert code == 2 and "dataset.val_fraction: 0.0 -> 0.1" in err and "trainer.best_on: 'test' -> 'auto'" in err
    assert "head.init:" not in err and snapshot(run_dir) == before  # the init is not a difference on resume
    code, _ = run_train("resume=latest", "dataset.val_fraction=0", "trainer.best_on=test")
    assert code == 0


def test_a_resume_keeps_the_runs_thread_count_and_refuses_another(run_train, metrics, capfd):
    """Float results depend on the torch thread count (issue #23): a resume that names none trains with the
    run's saved count, whatever the process has now (bit-exact); one that names another is refused like a change
    of model, the run left as it was."""
    with kept_threads():
        torch.set_num_threads(1)
        code, run_dir = run_train(*QUICK, "sched=constant", "trainer.stop_after_epoch=1")  # null: saved as 1
        assert code == 0
        torch.set_num_threads(2)
        before = snapshot(run_dir)
        code, _ = run_train("resume=latest", "trainer.num_threads=2")
        err = capfd.readouterr().err
        assert code == 2 and "trainer.num_threads: 1 -> 2" in err and snapshot(run_dir) == before
        assert run_train("resume=latest")[0] == 0
    assert metrics[1](run_dir)[1]["environment"]["torch_threads"] == 1  # the resumed epoch's record says so
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["trainer"]["num_threads"] == 1
    # inherited, not a setting: the report labels the job as before and notes no change on resume
    (entry,) = yaml.safe_load((run_dir / ".hydra" / "resumes.yaml").read_text())
    assert not any(o.startswith("trainer.num_threads") for o in entry["overrides"])
    assert changed_on_resume(run_dir / ".hydra") == []


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_resume_whose_tracker_cannot_start_leaves_the_run_byte_identical(
    run_train, tmp_path, monkeypatch, capfd, tracker
):
    """The experiment trackers start before the resume touches the run: a store that refuses (W&B online without
    an API key, an MLflow store that cannot be opened) fails it with every file as it was, metrics.json too."""
    code, run_dir = run_train(*QUICK, "sched=constant")
    assert code == 0
    if tracker == "wandb":
        wandb = pytest.importorskip("wandb")

        def no_api_key(**kwargs):
            raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

        monkeypatch.setattr(wandb, "init", no_api_key)
        store = ["logger=wandb", "logger.wandb.mode=online"]
    else:
        pytest.importorskip("mlflow")
        (tmp_path / "a_file").write_text("")
        store = ["logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"]
    before = snapshot(run_dir)
    code, _ = run_train(f"resume={run_dir}", "trainer.epochs=3", *store)
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "marginlab: error:" in err, err
    assert snapshot(run_dir) == before and read_metrics(run_dir)["status"] == "completed"


def test_a_resume_overtaken_between_its_check_and_the_lock_has_nothing_to_do(run_train, monkeypatch, capsys):
    """Two resumes of one run: the second passes its check while the first trains, and takes the lock once the
    first has completed the run. Checked again under the lock, it finds nothing to do and changes nothing."""
    code, run_dir = run_train(*QUICK, "sched=constant", "trainer.stop_after_epoch=1")
    assert code == 0
    check = resume.expand_resume
    completed = {}

    def checked_then_overtaken(args):
        expanded = check(args)  # the second resume's check: 1 of 2 epochs done, so it would train epoch 2
        monkeypatch.setattr(resume, "expand_resume", check)
        assert run_train(f"resume={run_dir}")[0] == 0  # meanwhile the first resume trains the run to its end
        completed.update(snapshot(run_dir))
        return expanded

    monkeypatch.setattr(resume, "expand_resume", checked_then_overtaken)
    capsys.readouterr()
    code, _ = run_train(f"resume={run_dir}")
    out = capsys.readouterr().out
    assert code == 0 and "already completed its 2 of 2 epochs: nothing to do" in out, out
    assert read_metrics(run_dir)["status"] == "completed" and "test/acc" in read_metrics(run_dir)
    assert snapshot(run_dir) == completed
