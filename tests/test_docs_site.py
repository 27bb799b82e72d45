"""The documentation site builds with ``mkdocs build --strict`` (issue #26): a broken link, a missing page, a
docstring mkdocstrings cannot render or a config the generated reference cannot read fails this test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="the docs extra is not installed (pip install -e '.[docs]')",
)
def test_the_docs_site_builds_strictly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    training = (tmp_path / "training" / "index.html").read_text()
    assert "trainer.best_on" in training and "subcenter_arcface" in training  # the generated config reference
    assert "lsoftmax_mnist" in training and "<!-- dataset-table -->" not in training  # what each dataset picks
    heads = (tmp_path / "heads" / "index.html").read_text()
    assert "AdaFaceHead" in heads and "<!-- head-table -->" not in heads  # the generated head table
    resume = (tmp_path / "resume" / "index.html").read_text()
    assert "trainer.device_index" in resume and "<!-- resumable-keys -->" not in resume  # RESUMABLE itself
    assert "ArcFaceHead" in (tmp_path / "api" / "index.html").read_text()  # mkdocstrings rendered the API
    assert not (tmp_path / "hooks").exists()  # the hook is not published as a page
