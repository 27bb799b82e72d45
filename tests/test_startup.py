"""`marginlab --help`, `marginlab train --help`, `report --help` and shell completion answer without importing torch
or SciPy (issue #16)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
import marginlab.commands.cli
try:
    code = marginlab.commands.cli.main({argv!r})
except SystemExit as exit:  # Hydra exits after printing its help
    code = exit.code or 0
assert code == 0, code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy", "scipy"))
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--help"],
        ["train", "--help"],
        ["train", "--hydra-help"],
        ["train", "--cfg", "job"],
        ["train", "-sc", "install=bash"],
        ["report", "--help"],
        ["reproduce", "--help"],
    ],
    ids=lambda a: " ".join(a) or "none",
)
def test_help_paths_leave_torch_unimported(argv, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CHECK.format(argv=argv)],
        check=False,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout[-2000:]
    assert not (tmp_path / "outputs").exists()  # printing help creates no run directory


def test_importing_the_cli_leaves_torch_unimported():
    code = (
        "import sys, marginlab.commands.cli, marginlab.config, marginlab.config.validate, marginlab.commands.train; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_importing_the_trainer_leaves_scipy_stack_unimported():
    """`marginlab train` reaches its first step without sklearn / SciPy / pandas (seconds of import): the
    verification metrics import sklearn when they are computed (marginlab/eval/verification.py)."""
    heavy = "{'sklearn', 'scipy', 'pandas', 'matplotlib', 'mlflow', 'wandb'}"
    code = f"import sys, marginlab.training.train; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
