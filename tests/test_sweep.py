"""`marginlab train -m`: a directory per job, failed jobs recorded and skipped, the exit code, the summary."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from marginlab.errors import TrainingError
from marginlab.training import sweep

from .conftest import run_cli

# tiny and fast: the digits default with a narrow net, one epoch of large batches
FAST = [
    "trainer.epochs=1",
    "logger=quiet",
    "trainer.checkpoint=false",
    "backbone.width=4",
    "backbone.embedding_dim=8",
    "dataset.batch_size=256",
]


def only_dir(path):
    dirs = [p for p in path.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_sweep_runs_every_job_records_the_failure_and_reports(outputs_dir, capsys):
    # arcface allows m <= pi/2: its two jobs fail, amsoftmax's two train
    code = run_cli("train", "-m", "head=amsoftmax,arcface", "m=1.8", "seed=0,1", "name=trial", *FAST)
    out = capsys.readouterr().out
    assert code == 1  # a job failed
    sweep_dir = only_dir(outputs_dir / "sweeps" / "trial")
    jobs = sorted(p.parent for p in sweep_dir.rglob(".hydra"))
    head = lambda job: next(part for part in job.parent.name.split(",") if part.startswith("head="))
    assert [(head(j), j.name) for j in jobs] == [
        ("head=amsoftmax", "seed=0"),
        ("head=amsoftmax", "seed=1"),
        ("head=arcface", "seed=0"),
        ("head=arcface", "seed=1"),
    ]
    assert "seed" not in jobs[0].parent.name and "m=1.8" in jobs[0].parent.name  # grouped by overrides minus seed
    for job in jobs:
        assert (job / ".hydra" / "overrides.yaml").is_file() and (job / "metrics.json").is_file()
    ok = json.loads((jobs[1] / "metrics.json").read_text())
    assert ok["status"] == "completed" and 0 <= ok["test/acc"] <= 1
    failed = json.loads((jobs[2] / "metrics.json").read_text())
    assert failed["status"] == "failed" and failed["error_type"] == "ConfigError" and "m=1.8" in failed["error"]

    summary = json.loads((sweep_dir / sweep.SUMMARY_FILE).read_text())
    assert (summary["jobs"], summary["completed"], summary["failed"]) == (4, 2, 2)
    assert summary["failed_jobs"][0]["dir"].endswith("seed=0") and "m=1.8" in summary["failed_jobs"][0]["error"]
    assert "sweep: 4 jobs, 2 completed, 2 failed" in out

    assert run_cli("report", str(sweep_dir)) == 0
    table = capsys.readouterr().out
    assert "| best | head" in table and "failed" in table
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]
    header = cells(table.splitlines()[0])  # best, head, head.s (each head's own scale), n, failed, metrics
    rows = {
        cells(line)[1]: dict(zip(header, cells(line)))
        for line in table.splitlines()
        if "| amsoftmax" in line or "| arcface" in line
    }
    first = header[header.index("failed") + 1]
    assert rows["amsoftmax"]["best"] == "best" and rows["amsoftmax"]["n"] == "2" and "±" in rows["amsoftmax"][first]
    assert rows["arcface"]["n"] == "0" and rows["arcface"]["failed"] == "2" and rows["arcface"][first] == "failed"
    assert (rows["amsoftmax"]["head.s"], rows["arcface"]["head.s"]) == ("30", "64")
    assert (sweep_dir / "report.md").read_text().startswith("| best")
    assert (sweep_dir / "report.csv").read_text().startswith("head,head.s,n,failed,")

    # a second multirun in the same process: a new sweep dir, the exit code of that sweep alone
    assert run_cli("train", "-m", "head=amsoftmax", "seed=0", "name=trial", *FAST) == 0
    assert len([p for p in (outputs_dir / "sweeps" / "trial").iterdir()]) in (1, 2)  # same second: same dir


def test_every_kind_of_failure_is_recorded_and_the_sweep_goes_on(outputs_dir, monkeypatch, capsys):
    import marginlab.training.train as train_module

    def fake_train(cfg, run_dir):
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        if cfg.seed == 0:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if cfg.seed == 1:
            raise TrainingError("10 consecutive non-finite losses: training diverged")
        if cfg.seed == 2:
            raise KeyError("a bug")
        summary = {"status": "completed", "test/acc": 0.5, "best_metric": "test/acc"}
        (run_dir / "metrics.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(train_module, "train", fake_train)
    assert run_cli("train", "-m", "seed=0,1,2,3") == 1
    captured = capsys.readouterr()
    sweep_dir = only_dir(outputs_dir / "sweeps" / "train")
    records = {p.parent.name: json.loads((p.parent / "metrics.json").read_text()) for p in sweep_dir.rglob(".hydra")}
    assert set(records) == {"seed=0", "seed=1", "seed=2", "seed=3"}
    assert all((p.parent.parent.name == "defaults") for p in sweep_dir.rglob(".hydra"))  # only the seed varied
    assert records["seed=0"]["error_type"] == "OutOfMemoryError" and "dataset.batch_size" in records["seed=0"]["error"]
    assert records["seed=1"]["error_type"] == "TrainingError" and "diverged" in records["seed=1"]["error"]
    assert records["seed=2"]["error_type"] == "KeyError"  # a bug: recorded with its traceback, the sweep goes on
    assert (sweep_dir / "defaults" / "seed=2" / "error.txt").read_text().startswith("Traceback")
    assert "Traceback" in captured.err and records["seed=3"]["status"] == "completed"
    assert "sweep: 4 jobs, 1 completed, 3 failed" in captured.out


class Stopped(BaseException):
    """SIGTERM-like: the sweep process ends in the middle of a job; nothing catches it, no summary is written."""


def test_jobs_a_stopped_sweep_never_started_are_reported(outputs_dir, monkeypatch, capsys):
    import marginlab.training.train as train_module

    def fake_train(cfg, run_dir):
        if cfg.seed == 2:
            raise Stopped
        summary = {"status": "completed", "test/acc": 0.5, "best_metric": "test/acc"}
        (run_dir / "metrics.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(train_module, "train", fake_train)
    with pytest.raises(Stopped):
        run_cli("train", "-m", "seed=0,1,2,3", "head=arcface")
    sweep_dir = only_dir(outputs_dir / "sweeps" / "train")
    assert not (sweep_dir / sweep.SUMMARY_FILE).exists()

    summary = sweep.summarize(sweep_dir)
    assert (summary["jobs"], summary["planned"], summary["not_started"]) == (3, 4, ["seed=3 head=arcface"])
    text = sweep.format_summary(summary)
    assert "3 jobs, 2 completed, 1 failed, 1 of 4 planned never started" in text
    assert "  not started: seed=3 head=arcface" in text

    assert run_cli("report", str(sweep_dir)) == 0
    out = capsys.readouterr().out
    assert (
        f"1 of 4 planned jobs of {sweep_dir} never started (the sweep stopped before them): seed=3 head=arcface" in out
    )
    assert "report of 3 jobs (1 planned never started) in 1 rows" in out


def test_single_run_out_of_memory_is_one_line(run_train, monkeypatch, capsys, metrics):
    import marginlab.training.train as train_module

    def oom(cfg, run_dir):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(train_module, "train", oom)
    code, run_dir = run_train()
    assert code == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "Traceback" not in err
    assert metrics[0](run_dir)["status"] == "failed"


def test_directory_resolvers():
    assert sweep.sweep_name(None, "digits_2d_comparison", None) == "digits_2d_comparison"
    assert sweep.sweep_name("mine", "digits_2d_comparison", None) == "mine"
    assert sweep.sweep_name(None, None, "amsoftmax_optuna") == "amsoftmax_optuna"
    assert sweep.sweep_name(None, None, None) == "train"
    assert sweep.sweep_name(None, "faces/a", None) == "faces_a"
    assert sweep.job_subdir("head=arcface,m=0.5", 3) == "head=arcface,m=0.5/seed=3"
    assert sweep.job_subdir("", 0) == "defaults/seed=0"
    assert sweep.job_subdir("dataset.root=/data/x", 0) == "dataset.root=_data_x/seed=0"
    long = sweep.job_subdir("x=" + "a" * 300, 0)
    assert len(long.split("/")[0]) <= 200


def test_optuna_search_records_failed_trials(outputs_dir, capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    # TPE with seed 1234 draws m = 5, 0.2, 5: AM-Softmax allows m <= 2, so two trials fail
    code = run_cli(
        "train",
        "hparams_search=amsoftmax_optuna",
        "hydra.sweeper.params={head.m:'choice(0.2,5)'}",
        "hydra.sweeper.n_trials=3",
        *FAST,
    )
    out = capsys.readouterr().out
    sweep_dir = only_dir(outputs_dir / "sweeps" / "amsoftmax_optuna")
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_params"]["head.m"] == 0.2 and 0 <= best["best_value"] <= 1
    summary = json.loads((sweep_dir / sweep.SUMMARY_FILE).read_text())
    assert summary["jobs"] == 3 and summary["completed"] >= 1 and summary["failed"] >= 1
    assert code == 1 and "failed" in out
    statuses = [json.loads((p.parent / "metrics.json").read_text())["status"] for p in sweep_dir.rglob(".hydra")]
    assert sorted(statuses) == ["completed", "failed", "failed"]
    assert not math.isnan(best["best_value"])


def test_launcher_config_composes_when_installed():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module

    import marginlab.config  # noqa: F401

    with initialize_config_module("marginlab.configs", version_base="1.3"):
        cfg = compose("train", overrides=["launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
