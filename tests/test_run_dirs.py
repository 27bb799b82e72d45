"""No run or sweep job writes into another's directory: each is claimed exclusively (marginlab/run_dirs.py)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from .conftest import run_cli, snapshot

FAST = [
    "logger=quiet",
    "trainer.epochs=1",
    "trainer.checkpoint=false",
    "backbone.width=4",
    "backbone.embedding_dim=8",
    "dataset.batch_size=256",
]
STAMP = "2030-01-02_03-04-05"
#: runs `marginlab <args>` with Hydra's ${now:...} frozen at 2030-01-02 03:04:05 (the same second for every run)
FROZEN_CLI = """
import datetime, sys
import hydra.core.utils
class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5)
hydra.core.utils.datetime = Frozen
from marginlab.commands.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Frozen(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2030, 1, 2, 3, 4, 5)


@pytest.fixture
def frozen_now(monkeypatch):
    """Hydra's ${now:...} resolver gives the same second to every run of the test."""
    import hydra.core.utils

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)


def test_claim_takes_the_next_free_name(tmp_path):
    from marginlab import run_dirs

    base = tmp_path / "a" / "run"
    assert run_dirs.claim_dir(base) == str(base)  # parents are created
    (tmp_path / "a" / "run-1").write_text("a file takes the name too")
    assert run_dirs.claim_dir(base) == str(tmp_path / "a" / "run-2")
    assert run_dirs.claim_subdir(tmp_path / "sweep", "m=0.5/seed=0") == os.path.join("m=0.5", "seed=0")
    assert run_dirs.claim_subdir(tmp_path / "sweep", "m=0.5/seed=0") == os.path.join("m=0.5", "seed=0-1")
    assert sorted(p.name for p in (tmp_path / "sweep" / "m=0.5").iterdir()) == ["seed=0", "seed=0-1"]


def test_claim_under_a_race_gives_each_claimant_its_own_directory(tmp_path):
    from marginlab import run_dirs

    n = 16
    start = threading.Barrier(n)

    def claim(_):
        start.wait()  # every thread calls os.mkdir on the same names at the same moment
        return run_dirs.claim_dir(tmp_path / "runs" / "same_second")

    with ThreadPoolExecutor(n) as pool:
        claimed = list(pool.map(claim, range(n)))
    assert len(set(claimed)) == n
    assert sorted(claimed) == sorted(
        str(tmp_path / "runs" / ("same_second" + (f"-{i}" if i else ""))) for i in range(n)
    )


def test_claim_of_an_unwritable_place_is_an_output_error(tmp_path):
    from marginlab import run_dirs

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(run_dirs.OutputError, match=r"cannot write .*file.*Not a directory \(ENOTDIR\)"):
        run_dirs.claim_dir(blocker / "runs" / "r")


def test_two_runs_started_in_the_same_second_never_share_a_directory(tmp_path):
    out = tmp_path / "outputs"
    env = {**os.environ, "MARGINLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FROZEN_CLI, "train", *FAST, f"seed={seed}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    runs = sorted((out / "runs").iterdir())
    assert [r.name for r in runs] == [f"{STAMP}_amsoftmax_digits", f"{STAMP}_amsoftmax_digits-1"]
    seeds = set()
    for run in runs:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records] == [1]  # one run's records only, not interleaved
        summary = json.loads((run / "metrics.json").read_text())
        assert summary["status"] == "completed" and Path(summary["run_dir"]).resolve() == run.resolve()
        seeds.add(yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["seed"])
    assert seeds == {1, 2}


def test_a_run_leaves_an_existing_directory_untouched(outputs_dir, frozen_now, metrics):
    taken = outputs_dir / "runs" / f"{STAMP}_amsoftmax_digits"
    (taken / ".hydra").mkdir(parents=True)
    (taken / ".hydra" / "config.yaml").write_text("seed: 7\n")
    (taken / "metrics.json").write_text('{"status": "completed"}\n')
    before = snapshot(taken)
    assert run_cli("train", *FAST) == 0
    assert snapshot(taken) == before
    new = taken.with_name(taken.name + "-1")
    assert metrics[0](new)["status"] == "completed" and sorted(p.name for p in (outputs_dir / "runs").iterdir()) == [
        taken.name,
        new.name,
    ]


def test_explicit_run_dir_is_used_as_is(outputs_dir, tmp_path):
    # resume= passes hydra.run.dir=<the run's directory>: no new directory is claimed
    given = tmp_path / "mine"
    assert run_cli("train", *FAST, f"hydra.run.dir={given}") == 0
    assert (given / "metrics.json").is_file() and not (outputs_dir / "runs").exists()


def fake_train(cfg, run_dir):
    summary = {"status": "completed", "test/acc": 0.5, "best_metric": "test/acc"}
    (run_dir / "metrics.json").write_text(json.dumps(summary))
    return summary


def job_dirs(root: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(root)) for p in root.rglob(".hydra"))


def test_sweeps_and_their_jobs_never_share_a_directory(outputs_dir, tmp_path, frozen_now, monkeypatch, capsys):
    import marginlab.training.train as train_module

    monkeypatch.setattr(train_module, "train", fake_train)
    # two sweeps in the same second: two sweep directories, each claimed once (no stray one per job)
    assert run_cli("train", "-m", "seed=0,1", "name=t") == 0
    assert run_cli("train", "-m", "seed=0,1", "name=t") == 0
    sweeps = sorted((outputs_dir / "sweeps" / "t").iterdir())
    assert [s.name for s in sweeps] == [STAMP, f"{STAMP}-1"]
    for s in sweeps:
        assert job_dirs(s) == ["name=t/seed=0", "name=t/seed=1"]
    assert not (outputs_dir / "runs").exists()  # a multirun claims no run directory

    # two multiruns sharing one explicit sweep directory: the second's jobs take the next free names
    shared = tmp_path / "shared"
    assert run_cli("train", "-m", "seed=0,1", f"hydra.sweep.dir={shared}") == 0
    assert run_cli("train", "-m", "seed=0", f"hydra.sweep.dir={shared}") == 0
    assert job_dirs(shared) == ["defaults/seed=0", "defaults/seed=0-1", "defaults/seed=1"]
    assert sorted(p.name for p in (shared / "defaults").iterdir()) == ["seed=0", "seed=0-1", "seed=1"]
    summary = json.loads((shared / "sweep_summary.json").read_text())
    assert (summary["jobs"], summary["completed"]) == (3, 3)


@pytest.mark.parametrize("name", ["..", ".", "../../../../x", "a/b", ""])
@pytest.mark.parametrize("sweep", [[], ["-m"]], ids=["run", "sweep"])
def test_a_name_is_one_directory_name_never_a_path(tmp_path, capfd, name, sweep):
    """name=../../../../x put a run outside outputs/, -m name=.. a sweep one level up: refused, nothing created."""
    before = sorted(tmp_path.rglob("*"))
    code = run_cli("train", *sweep, "logger=quiet", "trainer.epochs=1", f"name={name}")
    err = capfd.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"name={name!r} is not allowed" in err, err
    assert sorted(tmp_path.rglob("*")) == before
