"""Shared test fixtures: every run writes under a temporary outputs dir; runs go through the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from marginlab.cli import main


@pytest.fixture(autouse=True)
def outputs_dir(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "outputs"
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(out))
    monkeypatch.setenv("MARGINLAB_DATA_DIR", str(tmp_path / "data"))
    return out


@pytest.fixture
def run_train(outputs_dir):
    """``run_train(*overrides)`` runs `marginlab train` in-process; returns (exit code, the newest run dir)."""

    def run(*overrides: str) -> tuple[int, Path | None]:
        try:
            code = main(["train", *overrides])
        except SystemExit as exc:
            code = exc.code
        runs = sorted(outputs_dir.glob("runs/*"), key=lambda p: p.stat().st_mtime)
        return code, (runs[-1] if runs else None)

    return run


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def metrics():
    """Readers for a run's metrics.json / metrics.jsonl."""
    return read_metrics, read_jsonl


# ---- torchrun on CPU (gloo) for the data-parallel tests ----

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m marginlab train *overrides`` writing under ``out``; nproc=0 runs
    ``marginlab train`` as a plain process (no torchrun, no process group)."""
    env = {**os.environ, "MARGINLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    runner = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}"] if nproc else [sys.executable]
    res = subprocess.run([*runner, "-m", "marginlab", "train", *overrides], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def epoch_records(out: Path) -> list[dict]:
    """metrics.jsonl of the only run under ``out``."""
    (run_dir,) = list((out / "runs").iterdir())
    return read_jsonl(run_dir)


@pytest.fixture
def torchrun():
    """``torchrun.launch(nproc, out, *overrides)`` and ``torchrun.epochs(out)``."""
    return type("TorchRun", (), {"launch": staticmethod(launch), "epochs": staticmethod(epoch_records)})
