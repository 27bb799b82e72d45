"""Launching ``marginlab train`` under torchrun on CPU (gloo) for the data-parallel tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest


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
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def torchrun():
    """``torchrun.launch(nproc, out, *overrides)`` and ``torchrun.epochs(out)``."""
    return type("TorchRun", (), {"launch": staticmethod(launch), "epochs": staticmethod(epoch_records)})
