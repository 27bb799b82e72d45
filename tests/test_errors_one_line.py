"""User and environment errors are one line and exit 2 everywhere; failed runs say why; JSON files are strict."""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import run_cli

FAST = [
    "logger=quiet",
    "trainer.epochs=1",
    "trainer.checkpoint=false",
    "backbone.width=4",
    "backbone.embedding_dim=8",
    "dataset.batch_size=256",
]


def one_line_error(err: str) -> str:
    """The error lines on stderr; there must be one, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("marginlab: error:")]
    assert len(lines) == 1, err
    return lines[0]


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- files the system refuses to write
def test_unwritable_outputs_is_one_line_and_exit_2(tmp_path, monkeypatch, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("outputs cannot be created below a file")
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(blocker / "outputs"))
    for args in ([], ["-m", "seed=0,1"]):
        assert run_cli("train", *args, *FAST) == 2
        line = one_line_error(capfd.readouterr().err)
        assert str(blocker) in line and "Not a directory (ENOTDIR)" in line
    assert blocker.read_text() == "outputs cannot be created below a file"


#: what torch 2.14's zip writer raises when the file system refuses a write under it (seen with ``ulimit -f``: the
#: OSError is its __context__); without an OSError, when torch wrote through its own file
TORCH_WRAPPED = "[enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 3350"


def failing_save(code: int | None, wrapped: bool):
    """torch.save that writes the first epoch's checkpoints and fails on the second's as the file system makes it:
    OSError(code) itself, or torch's RuntimeError wrapping it (``code`` None: wrapping no OSError)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if obj["state"]["epoch"] < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"partial")
        try:
            raise OSError(code, os.strerror(code)) if code else RuntimeError("basic_ios::clear: iostream error")
        except (OSError, RuntimeError):
            if wrapped:
                raise RuntimeError(TORCH_WRAPPED)  # noqa: B904 - torch raises it so: the OSError is its context
            raise

    return save


def test_torchs_wrapped_write_failure_is_the_machine_not_a_bug():
    from marginlab import error_kinds

    try:
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError:
            raise RuntimeError(TORCH_WRAPPED)  # noqa: B904 - as torch raises it
    except RuntimeError as err:
        wrapped = err
    assert error_kinds.is_user_error(wrapped)
    assert error_kinds.describe(wrapped, Path("/run")) == "cannot write the run's files in /run: File too large (EFBIG)"
    read_error = RuntimeError("[enforce fail at inline_container.cc:316] . file not found: archive/data.pkl")
    assert not error_kinds.is_user_error(read_error)  # torch's reader: not a write the system refused


@pytest.mark.parametrize(
    "code,wrapped",
    [
        (errno.ENOSPC, False),
        (errno.EACCES, False),
        (errno.ENOSPC, True),
        (errno.EFBIG, True),
        (errno.EDQUOT, True),
        (errno.EROFS, True),
        (errno.EACCES, True),
        (None, True),
    ],
)
def test_a_checkpoint_write_that_fails_mid_run_is_recorded(run_train, monkeypatch, capfd, metrics, code, wrapped):
    monkeypatch.setattr(torch, "save", failing_save(code, wrapped))
    exit_code, run_dir = run_train(*FAST, "trainer.checkpoint=true", "trainer.epochs=2")
    line = one_line_error(capfd.readouterr().err)
    assert exit_code == 2
    reason = f"{os.strerror(code)} ({errno.errorcode[code]})" if code else "the write failed, no reason given"
    assert reason in line and f"cannot write {run_dir / 'checkpoints'}" in line, line
    assert f"{run_dir / 'checkpoints' / 'last.pt'} of an earlier epoch is kept: resume={run_dir}" in line, line
    record = metrics[0](run_dir)
    assert record["status"] == "failed" and reason in record["error"]
    assert "traceback" not in record and not (run_dir / "error.txt").exists()  # not a bug
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp file
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] == 1  # untouched


def test_a_run_stopped_by_a_full_disk_resumes(run_train, monkeypatch, capfd, metrics):
    monkeypatch.setattr(torch, "save", failing_save(errno.ENOSPC, wrapped=True))
    _, run_dir = run_train(*FAST, "trainer.checkpoint=true", "trainer.epochs=2")
    monkeypatch.undo()  # space again
    assert run_train(f"resume={run_dir}")[0] == 0
    assert metrics[0](run_dir)["status"] == "completed" and [r["epoch"] for r in metrics[1](run_dir)] == [1, 2]


def test_a_checkpoint_write_over_the_file_size_limit_is_one_line(tmp_path):
    # a real `ulimit -f` (in a child process: the limit stays there): torch's own wrapped error, SIGXFSZ ignored
    code = f"""
import resource, signal, torch
from marginlab.training import checkpoint
from marginlab.errors import OutputError
path = {str(tmp_path / "checkpoints" / "last.pt")!r}
checkpoint.save_atomic({{"x": torch.zeros(10)}}, __import__("pathlib").Path(path))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    checkpoint.save_atomic({{"x": torch.zeros(100_000)}}, __import__("pathlib").Path(path))
except OutputError as err:
    print(err)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    last = tmp_path / "checkpoints" / "last.pt"
    assert result.stdout.strip() == (
        f"cannot write {last}: File too large (EFBIG); {last} of an earlier epoch is kept: resume={tmp_path} "
        "continues from it"
    )
    assert torch.load(last, weights_only=True)["x"].shape == (10,)  # the earlier checkpoint, untouched
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"]  # no temp file


# ---------------------------------------------------------------- bad values, before any work
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lr=-0.1"], "optim.lr=-0.1 is not allowed: it must be a finite number >= 0"),
        (["optim.lr=abc"], "optim.lr='abc' is not allowed: it must be a number"),
        (["optim.lr=nan"], "optim.lr=nan is not allowed"),
        (["optim.weight_decay=-5e-4"], "optim.weight_decay=-0.0005 is not allowed"),
        (["optim.momentum=-0.9"], "optim.momentum=-0.9 is not allowed"),
        (["optim.momentum=abc"], "optim.momentum='abc' is not allowed: it must be a number"),
        (["optim=adamw", "optim.betas=[1.5,0.9]"], "optim.betas=[1.5, 0.9] is not allowed: it must be two numbers"),
        (["optim=adamw", "optim.betas=[0.9]"], "optim.betas=[0.9] is not allowed: it must be two numbers in [0, 1)"),
        (["optim=adamw", "optim.betas=[0.9,0.99,0.5]"], "optim.betas=[0.9, 0.99, 0.5] is not allowed"),
        (["optim=adamw", "optim.betas=[0.9,1.0]"], "optim.betas=[0.9, 1.0] is not allowed"),
        (["optim=adamw", "optim.betas=0.9"], "optim.betas=0.9 is not allowed"),
        (["optim=adamw", "optim.betas=[a,0.9]"], "optim.betas=['a', 0.9] is not allowed"),
        (["optim.nesterov=true", "optim.momentum=0"], "Nesterov momentum requires a momentum"),
    ],
)
def test_bad_optimizer_values_fail_before_any_work(run_train, monkeypatch, capfd, metrics, overrides, message):
    import marginlab.training.builders

    def no_data(cfg):
        raise AssertionError("the data was built: the bad value was not caught by the validation")

    monkeypatch.setattr(marginlab.training.builders, "build_data", no_data)
    code, run_dir = run_train(*FAST, *overrides)
    line = one_line_error(capfd.readouterr().err)
    assert code == 2 and message in line
    assert metrics[0](run_dir)["error_type"] == "ConfigError"


def test_a_corrupt_geometry_file_is_one_line_in_plot(tmp_path, capfd):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "geometry").mkdir()
    np.savez(
        run / "geometry" / "epoch_001.npz",
        epoch=1,
        features=np.zeros((4, 2), np.float32),
        labels=np.zeros(4, np.int64),
        target_deg=np.zeros(4, np.float32),
    )
    good = (run / "geometry" / "epoch_001.npz").read_bytes()
    (run / "geometry" / "epoch_002.npz").write_bytes(good[: len(good) // 2])  # truncated, e.g. a full disk
    assert run_cli("plot", str(run)) == 2
    line = one_line_error(capfd.readouterr().err)
    assert "epoch_002.npz cannot be read" in line
    (run / "geometry" / "epoch_002.npz").write_bytes(b"not an npz at all")
    assert run_cli("plot", str(tmp_path)) == 2  # the same inside a sweep directory
    assert "epoch_002.npz cannot be read" in one_line_error(capfd.readouterr().err)


# ---------------------------------------------------------------- Hydra-level errors exit 2 too
@pytest.mark.parametrize(
    "overrides,message",
    [
        (["head=nope"], "Could not find 'head/nope'"),
        (["m=abc"], "m=abc (Value 'abc' of type 'str' could not be converted to Float; full_key: m)"),
        (["trainer.epochs=[1"], "no viable alternative at input '[1'"),
        (["trainer.nope=3"], "Key 'nope' not in 'TrainerConfig'; full_key: trainer.nope"),
        (["+seed=1"], "Could not append to config. An item is already at 'seed'"),
        (["head.m=${nope}"], "Interpolation key 'nope' not found"),  # read in the run, still the user's config
    ],
)
def test_hydra_errors_exit_2_without_traceback(run_train, capfd, overrides, message):
    code, _ = run_train(*FAST, *overrides)
    err = capfd.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("marginlab: error:") and message in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["-m", "--cfg", "job"], "--multirun and --cfg cannot be combined: give one of --run, --multirun, --cfg"),
        (["--multirun", "-c", "all"], "drop -m and give one value per key (marginlab train --cfg job seed=0)"),
        (["-m", "--info", "all"], "--multirun and --info cannot be combined"),
    ],
)
def test_a_sweep_with_cfg_or_info_is_one_line(outputs_dir, capfd, args, message):
    # Hydra prints one job's config and refuses two modes at once with a ValueError
    assert run_cli("train", *args, "seed=0,1") == 2
    assert message in one_line_error(capfd.readouterr().err)
    assert not outputs_dir.exists()  # nothing ran, nothing was written


def test_a_bug_in_a_single_run_keeps_exit_1_and_is_recorded(run_train, monkeypatch, capfd, metrics):
    import marginlab.training.train as train_module

    def bug(cfg, run_dir):
        raise KeyError("a bug")

    monkeypatch.setattr(train_module, "train", bug)
    code, run_dir = run_train(*FAST)
    err = capfd.readouterr().err
    assert code == 1 and "Traceback" in err
    record = metrics[0](run_dir)
    assert record["status"] == "failed" and record["error_type"] == "KeyError"
    assert (run_dir / "error.txt").read_text().startswith("Traceback")


def test_a_sweep_with_values_that_do_not_compose_lists_them_all_and_starts_no_job(outputs_dir, capfd):
    assert run_cli("train", "-m", "m=0.35,abc,xyz", "seed=0,1", *FAST) == 2
    line_and_list = capfd.readouterr().err
    assert "Traceback" not in line_and_list
    assert "no job was started" in line_and_list
    assert "m=abc (Value 'abc'" in line_and_list and "m=xyz (Value 'xyz'" in line_and_list
    assert "[2 of 6 jobs]" in line_and_list
    assert not list(outputs_dir.rglob("metrics.json"))  # the good jobs did not run either, as documented


def test_a_sweep_value_that_composes_but_is_rejected_fails_only_its_job(outputs_dir, capsys):
    assert run_cli("train", "-m", "optim.lr=0.1,-1", *FAST) == 1
    records = {p.parent.parent.name: json.loads(p.read_text()) for p in outputs_dir.rglob("metrics.json")}
    (good,) = [r for name, r in records.items() if "optim.lr=0.1" in name]
    (bad,) = [r for name, r in records.items() if "optim.lr=-1" in name]
    assert good["status"] == "completed"
    assert bad["status"] == "failed" and "optim.lr=-1 is not allowed" in bad["error"]


# ---------------------------------------------------------------- strict JSON
def test_a_best_metric_of_minus_inf_is_null_in_metrics_json(run_train, metrics):
    # stopped before its first evaluation: the best metric is still -inf
    code, run_dir = run_train(*FAST, "trainer.epochs=2", "trainer.eval_every_n_epochs=2", "trainer.stop_after_epoch=1")
    assert code == 0
    record = strict_loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "stopped" and record["best/val/acc"] is None  # chosen on the validation split
    assert record["nonfinite"] == {"best/val/acc": "-inf"}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_loads(line)

    from marginlab.report.jobs import read_job

    assert read_job(run_dir).metrics["best/val/acc"] == -math.inf  # readers get the float back


def test_every_json_writer_writes_nan_and_inf_as_null(tmp_path):
    from marginlab.files import restore_nonfinite, write_json
    from marginlab.logging.run_log import RunLog

    log = RunLog(tmp_path, tensorboard=False)
    log.epoch_record({"epoch": 1, "train/loss": float("nan"), "test/acc": 0.5})
    log.final(
        {
            "status": "completed",
            "best/test/acc": float("nan"),
            "test/loss": float("inf"),
            "results": {"lfw": {"fpr": [0.0, float("nan")], "auc": np.float32("nan")}},
        }
    )
    epoch = strict_loads((tmp_path / "metrics.jsonl").read_text())
    assert epoch["train/loss"] is None and epoch["nonfinite"] == {"train/loss": "nan"} and epoch["test/acc"] == 0.5
    final = strict_loads((tmp_path / "metrics.json").read_text())
    assert final["best/test/acc"] is None and final["results"]["lfw"]["fpr"] == [0.0, None]
    assert final["nonfinite"] == {
        "best/test/acc": "nan",
        "test/loss": "inf",
        "results.lfw.fpr[1]": "nan",
        "results.lfw.auc": "nan",
    }
    assert "nan" not in {v for v in final.values() if isinstance(v, str)}
    back = restore_nonfinite(final)
    assert math.isnan(back["best/test/acc"]) and back["test/loss"] == math.inf
    write_json(tmp_path / "plain.json", {"a": 1})
    assert strict_loads((tmp_path / "plain.json").read_text()) == {"a": 1}  # no "nonfinite" key when all is finite
    assert not list(tmp_path.glob("*.tmp"))


def test_no_json_is_written_outside_files():
    # every JSON file goes through marginlab/files.py (write_json / dumps), which writes NaN/inf as null
    package = Path(__file__).resolve().parents[1] / "marginlab"
    writers = [
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if p != package / "files.py" and ("json.dump(" in p.read_text() or "json.dumps(" in p.read_text())
    ]
    assert writers == []
