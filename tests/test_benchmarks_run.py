"""The GPU-readiness and face-pipeline benchmarks run end to end at toy size on the CPU, so they never rot."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SLOW = pytest.mark.skipif(
    not os.environ.get("MARGINLAB_SLOW_TESTS"),
    reason="torch.compile rows of the tiny GPU benchmark: set MARGINLAB_SLOW_TESTS=1",
)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows(text: str) -> list[tuple[float, str]]:
    return [
        (float(rate), rest) for rate, rest in re.findall(r"^\s+([\d.]+) images/s\s+peak\s+(.*)$", text, re.MULTILINE)
    ]


def test_gpu_throughput_tiny_runs_every_head_and_data_path(capsys):
    assert load("gpu_throughput").main(["--tiny", "--compile", "off"]) == 0
    found = rows(capsys.readouterr().out)
    assert [rest.split("   ", 1)[1] for _, rest in found] == [
        "arcface (20 classes), compile off, synthetic data",
        "arcface (20 classes), compile off, recordio data",
        "partial_fc_0.1 (200 classes), compile off, synthetic data",
        "partial_fc_0.1 (200 classes), compile off, recordio data",
    ]
    assert all(rate > 0 for rate, _ in found)


@SLOW
def test_gpu_throughput_tiny_compiled(capsys):
    assert load("gpu_throughput").main(["--tiny", "--compile", "on"]) == 0
    assert len(rows(capsys.readouterr().out)) == 4


def test_face_pipeline_reports_ratios_and_cores(capsys):
    load("face_pipeline").main(["--images", "32", "--repeats", "1", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert len(re.findall(r"x baseline \(", out)) == 4
    assert len(re.findall(r"^5000 images/s needs \d+ worker core\(s\)", out, re.MULTILINE)) == 3
