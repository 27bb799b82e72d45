"""Shared test fixtures: every run writes under a temporary outputs dir; runs go through the real CLI."""

from __future__ import annotations

import json
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
