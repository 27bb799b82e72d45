"""Data-parallel training with torchrun on CPU (gloo, 2 processes): the same loss curve as 1 process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

# no BatchNorm: per-rank batch statistics would differ from the single process's by design
RUN = ["logger=quiet", "trainer.epochs=2", "backbone=lenet_pp", "backbone.batch_norm=false",
       "backbone.embedding_dim=16", "head=amsoftmax", "dataset.batch_size=64", "sched=constant", "optim.lr=0.05"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MARGINLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "marginlab", "train", *RUN, *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def epochs(out) -> list[dict]:
    (run_dir,) = list((out / "runs").iterdir())
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res = launch(1, one)
    assert res.returncode == 0, res.stderr[-3000:]
    res = launch(2, two, "trainer.stop_after_epoch=1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((two / "runs").iterdir())) == 1  # only rank 0 made a run directory
    # resume the 2-process run with 1 process (a different world size)
    res = subprocess.run([sys.executable, "-m", "marginlab", "train", "resume=latest"], capture_output=True, text=True,
                         env={**os.environ, "MARGINLAB_OUTPUT_DIR": str(two)}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = epochs(one), epochs(two)
    assert [r["epoch"] for r in b] == [1, 2]
    # epoch 1: same global batches, gradients averaged over ranks == the single process's gradient
    assert b[0]["train/loss"] == pytest.approx(a[0]["train/loss"], rel=2e-3)
    assert b[0]["test/acc"] == pytest.approx(a[0]["test/acc"], abs=0.02)
    assert b[1]["train/loss"] == pytest.approx(a[1]["train/loss"], rel=5e-2)
