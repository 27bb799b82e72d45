"""A regular (non-editable) install carries the configs and runs from another directory."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_runs_elsewhere(tmp_path):
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("marginlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "marginlab/configs/train.yaml" in names
    assert "marginlab/configs/head/amsoftmax.yaml" in names
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target), "MARGINLAB_OUTPUT_DIR": str(elsewhere / "outputs")}
    code = (
        "import marginlab, sys; assert marginlab.__file__.startswith(sys.argv[1]), marginlab.__file__; "
        "from marginlab.commands.cli import main; sys.exit(main(['train', 'trainer.epochs=1', 'logger=quiet']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(target)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "completed 1/1 epochs" in out.stdout
    assert list((elsewhere / "outputs" / "runs").glob("*/metrics.json"))
