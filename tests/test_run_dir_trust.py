"""A run directory is untrusted input: what a resume replays from ``.hydra/overrides.yaml`` and
``.hydra/resumes.yaml`` may only set config keys and choose shipped group options. A hostile entry is refused in
one line naming the file and the line, nothing it names runs, and the run stays byte-identical."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from marginlab.replayed_overrides import refusal

from .conftest import run_cli, snapshot

QUICK = ["logger=quiet", "trainer.epochs=2", "trainer.stop_after_epoch=1"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped after epoch 1 of 2: a resume of it would train, so it replays its overrides."""
    out = tmp_path_factory.mktemp("stopped") / "outputs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINLAB_OUTPUT_DIR", str(out))
        assert run_cli("train", *QUICK) == 0
    (run,) = out.glob("runs/*")
    return run


@pytest.fixture
def run_dir(stopped_run, outputs_dir) -> Path:
    target = outputs_dir / "runs" / stopped_run.name
    shutil.copytree(stopped_run, target)
    return target


def payloads(tmp: Path) -> dict[str, str]:
    pwned = tmp / "pwned"
    return {
        "hydra callback touch": ["+hydra.callbacks.x._target_=pathlib.Path.touch", f"+hydra.callbacks.x.self={pwned}"],
        "hydra callback write": [
            "+hydra.callbacks.x._target_=pathlib.Path.write_text",
            f"+hydra.callbacks.x.self={pwned}",
            "+hydra.callbacks.x.data=owned",
        ],
        "hydra run dir": [f"hydra.run.dir={pwned}"],
        "hydra search path": [f"hydra.searchpath=[file://{tmp}]"],
        "head target": ["head._target_=pathlib.Path.touch"],
        "nested target": [f"+head.extra={{_target_: pathlib.Path.touch, self: '{pwned}'}}"],
        "args key": ["+backbone._args_=[1]"],
        "resolver creates a dir": [f"name='${{unique_dir:{pwned}}}'"],
        "env interpolation": ["dataset.root='${oc.env:HOME}'"],
        "path as group option": ["head=../../../../tmp/evil"],
        "unknown group option": ["optim=nope"],
        "package": ["head@foo=arcface"],
        "sweep": ["seed=choice(0,1)"],
        "key outside the schema": [f"+evil.self={pwned}"],
        "not a string": [{"_target_": "pathlib.Path.touch"}],
        "not an override": ["a b = c"],
        "deletes a hydra key": ["~hydra.job.chdir"],
        "deletes a target": ["~head._target_"],
    }


CASES = list(payloads(Path("/x")))


def append_overrides(path: Path, extra: list) -> int:
    """Appends ``extra`` to the YAML list in ``path``; the line its first entry lands on."""
    items = yaml.safe_load(path.read_text()) or []
    path.write_text(yaml.safe_dump(items + extra, sort_keys=False))
    return len(items) + 1


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_overrides_file_is_refused_and_nothing_runs(run_dir, tmp_path, capfd, case):
    extra = payloads(tmp_path)[case]
    line = append_overrides(run_dir / ".hydra" / "overrides.yaml", extra)
    before = snapshot(run_dir)
    code = run_cli("train", f"resume={run_dir}")
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("marginlab: error:"), err
    assert f"overrides.yaml:{line}:" in err and "untrusted" in err, err
    assert not (tmp_path / "pwned").exists()
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("case", ["hydra callback touch", "head target", "resolver creates a dir"])
def test_a_hostile_resume_history_is_refused_and_nothing_runs(run_dir, tmp_path, capfd, case):
    history = run_dir / ".hydra" / "resumes.yaml"
    legit = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    entries = [{"time": "2026-12-07 00:00:00", "from_epoch": 1, "overrides": legit + payloads(tmp_path)[case]}]
    history.write_text(yaml.safe_dump(entries, sort_keys=False))
    before = snapshot(run_dir)
    code = run_cli("train", f"resume={run_dir}")
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "resumes.yaml:" in err and "untrusted" in err, err
    assert not (tmp_path / "pwned").exists()
    assert snapshot(run_dir) == before


def test_an_untampered_run_still_resumes(run_dir):
    assert run_cli("train", f"resume={run_dir}") == 0
    assert yaml.safe_load((run_dir / ".hydra" / "resumes.yaml").read_text())[-1]["from_epoch"] == 1


@pytest.mark.parametrize(
    "override",
    [
        "head=arcface",
        "m=0.35",
        "s=30",
        "name=my_run",
        "seed=3",
        "verification=[lfw,cfp_fp]",
        "regularizer=center",
        "regularizer=null",
        "~regularizer",
        "~head.lr_mult",
        "+regularizer=incay",
        "experiment=digits_2d_comparison",
        "optim=adamw",
        "optim.betas=[0.9,0.99]",
        "+head.chunked=auto",
        "++trainer.epochs=3",
        "dataset.root=/data/casia",
        "logger.mlflow={tracking_uri: 'file:///tmp/mlruns', experiment: x}",
        "trainer.device=cuda:0",
    ],
)
def test_what_a_run_can_hold_is_replayed(override):
    assert refusal(override) is None


def test_plot_refuses_a_hostile_overrides_file(run_dir, tmp_path, capfd):
    line = append_overrides(run_dir / ".hydra" / "overrides.yaml", payloads(tmp_path)["head target"])
    code = run_cli("plot", str(run_dir.parent))  # a folder of runs: panels titled by their overrides
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"overrides.yaml:{line}:" in err, err
    assert not list(run_dir.parent.glob("*.png"))


@pytest.mark.parametrize("bad", ["../../../tmp/x", "a b", "", "x" * 65, "id\nmore"])
def test_a_hostile_wandb_run_id_is_refused(tmp_path, bad):
    from marginlab.errors import ConfigError
    from marginlab.logging.wandb_tracker import read_run_id

    path = tmp_path / "wandb_run_id"
    path.write_text(bad)
    with pytest.raises(ConfigError, match="not a W&B run id"):
        read_run_id(path)
    path.write_text("1a2b3c4d\n")
    assert read_run_id(path) == "1a2b3c4d"


def test_hand_made_eval_records_are_skipped_not_merged(tmp_path):
    from marginlab.eval.standalone import eval_dir, merged_record, write_record

    ckpt = tmp_path / "best.pt"
    good = {"set": "lfw", "time": "2026-12-07T00:00:00", "scalars": {"lfw/acc": 0.99}, "result": {"acc": 0.99}}
    write_record(ckpt, "lfw", good, "a")
    hostile = [
        {"set": "lfw", "time": 5, "scalars": {}},
        {"set": ["lfw"], "time": "2027"},
        {"set": "x", "time": "2027", "scalars": ["lfw/acc", 1.0]},
        {"set": "y", "time": "2027", "nonfinite": "all"},
    ]
    for i, record in enumerate(hostile):
        (eval_dir(ckpt) / f"z{i}.json").write_text(json.dumps(record))
    merged = merged_record(ckpt)
    assert merged["results"] == {"lfw": {"acc": 0.99}} and merged["lfw/acc"] == 0.99
    assert len(merged["evaluations"]) == 1


def test_report_refuses_a_hostile_overrides_file(run_dir, tmp_path, capfd):
    line = append_overrides(run_dir / ".hydra" / "overrides.yaml", payloads(tmp_path)["resolver creates a dir"])
    code = run_cli("report", str(run_dir))
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"overrides.yaml:{line}:" in err, err
    assert not (tmp_path / "pwned").exists()


def test_a_hostile_sweep_plan_is_not_expanded(tmp_path):
    import time

    from marginlab.report.jobs import planned_jobs
    from marginlab.training.sweep import BASIC_SWEEPER

    plan = {"hydra": {"sweeper": {"_target_": BASIC_SWEEPER, "params": {}}, "overrides": {"task": []}}}
    plan["hydra"]["overrides"]["task"] = ["seed=range(0,1000000000000)", "head=arcface,cosface"]
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(plan))
    started = time.perf_counter()
    assert planned_jobs(tmp_path) is None  # unknown, not a trillion jobs in memory
    assert time.perf_counter() - started < 5
    plan["hydra"]["overrides"]["task"] = ["seed=range(0,3)", "head=arcface,cosface"]
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(plan))
    assert len(planned_jobs(tmp_path)) == 6
