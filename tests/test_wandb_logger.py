"""logger=wandb: a run's config, epoch metrics, best/* summary, figures and exit code in an offline W&B run,
read back with wandb's own reader of its .wandb files (`wandb leet inspect --json`), no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TRACKER_ONLY, hide_module

pytest.importorskip("wandb")
pytest.importorskip("wandb.cli.leet", reason="reading an offline run back needs `wandb leet inspect` (recent wandb)")

FAST = TRACKER_ONLY


@pytest.fixture(autouse=True)
def quiet_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leaves pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")


def read_offline_run(path: Path) -> dict:
    """One .wandb file, as wandb itself reads it: run id, config, history [(step, row)], summary, exit code."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=True,
    )
    run = {"run_id": None, "config": {}, "history": [], "summary": {}, "exit_code": None}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        kind = record.get("type")
        if kind == "run":
            run["run_id"] = record["run"]["run_id"]
            run["config"].update(record["run"].get("config", {}).get("update", {}))
        elif kind == "config":
            run["config"].update(record["config"].get("update", {}))
        elif kind == "history":
            history = record["history"]
            run["history"].append((int(history.get("step", {}).get("num", 0)), history["item"]))
        elif kind == "summary":
            run["summary"].update(record["summary"].get("update", {}))
        elif kind == "exit":
            run["exit_code"] = record["exit"].get("exit_code", 0)
    run["config"].pop("_wandb", None)
    return run


def offline_runs(run_dir: Path) -> list[dict]:
    """The offline runs W&B wrote under ``<run dir>/wandb/``, oldest first."""
    return [read_offline_run(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]


def test_logger_wandb_writes_an_offline_run_into_the_run_dir(run_train, metrics):
    code, run_dir = run_train("logger=wandb", "trainer.epochs=2", *FAST, "optim.lr=0.05")
    assert code == 0
    (run,) = offline_runs(run_dir)
    assert run["run_id"] == (run_dir / "wandb_run_id").read_text().strip()
    assert run["config"]["head"] == "amsoftmax" and run["config"]["optim.lr"] == 0.05
    assert run["config"]["trainer.epochs"] == 2 and "logger.tensorboard" not in run["config"]
    records = metrics[1](run_dir)
    assert [step for step, _ in run["history"]] == [r["step"] for r in records] and len(records) == 2
    for (_, row), record in zip(run["history"], records):
        assert row["test/acc"] == pytest.approx(record["test/acc"]) and row["train/loss"] == record["train/loss"]
        assert "epoch" not in row and "warnings" not in row
    best = {k: v for k, v in metrics[0](run_dir).items() if k.startswith("best/") and isinstance(v, float)}
    assert best and {k: run["summary"][k] for k in best} == pytest.approx(best)
    assert run["exit_code"] == 0


def test_a_resumed_run_continues_its_wandb_run(run_train, metrics):
    code, run_dir = run_train("logger=wandb", "trainer.epochs=2", "trainer.stop_after_epoch=1", *FAST)
    assert code == 0
    code, resumed = run_train("logger=wandb", f"resume={run_dir}", *FAST)
    assert code == 0 and resumed == run_dir
    first, second = offline_runs(run_dir)  # one offline file per process; `wandb sync` merges them into one run
    assert first["run_id"] == second["run_id"] == (run_dir / "wandb_run_id").read_text().strip()
    steps = [step for run in (first, second) for step, _ in run["history"]]
    assert steps == [r["step"] for r in metrics[1](run_dir)] and len(steps) == 2
    assert second["summary"]["best/epoch"] == metrics[0](run_dir)["best/epoch"]
    assert (first["exit_code"], second["exit_code"]) == (0, 0)


def test_a_failed_run_ends_with_exit_code_1_and_its_figures(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from marginlab.logging import RunLog

    run_dir = tmp_path / "run"
    cfg = OmegaConf.create({"seed": 0, "optim": {"lr": 0.1}, "logger": {"wandb": {"mode": "offline", "tags": ["t"]}}})
    log = RunLog(run_dir, tensorboard=False, console=False)
    log.start(cfg)
    log.epoch_record({"epoch": 1, "step": 5, "test/acc": 0.5, "train/loss": float("inf"), "warnings": ["w"]})
    (run_dir / "figures").mkdir()
    Image.new("RGB", (8, 8)).save(run_dir / "figures" / "angles.png")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.close()
    (run,) = offline_runs(run_dir)
    assert run["config"] == {"seed": 0, "optim.lr": 0.1} and run["exit_code"] == 1
    rows = dict(run["history"])
    assert rows[5]["test/acc"] == 0.5 and "train/loss" not in rows[5]  # +-inf left out, as in MLflow
    assert rows[5]["figures/angles._type"] == "image-file"  # the PNG, as a wandb.Image at the last step
    (image,) = run_dir.glob("wandb/offline-run-*/files/" + rows[5]["figures/angles.path"])
    assert image.stat().st_size > 0


def test_logger_wandb_without_wandb_or_with_a_bad_mode_is_a_one_line_config_error(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from marginlab.errors import ConfigError
    from marginlab.logging.wandb_tracker import MISSING, WandbTracker

    assert WandbTracker.from_config(OmegaConf.create({"logger": {"wandb": None}}), tmp_path) is None
    bad = OmegaConf.create({"logger": {"wandb": {"mode": "offlin"}}})
    with pytest.raises(ConfigError, match="logger.wandb.mode='offlin' is not one of offline, online, disabled"):
        WandbTracker.from_config(bad, tmp_path)
    hide_module(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match="marginlab\\[wandb\\]") as err:
        WandbTracker.from_config(OmegaConf.create({"logger": {"wandb": {"mode": "offline"}}}), tmp_path)
    assert str(err.value) == MISSING and "\n" not in MISSING
    assert not (tmp_path / "wandb").exists()
