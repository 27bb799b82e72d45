"""``marginlab plot`` for a paper: runs titled by human labels (the paper's head name with the s and m the run
trained with, defaults included), a seed filter, png / pdf / svg at a chosen dpi and column width."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from marginlab.commands.plot import main as plot_main
from marginlab.commands.plot import run_titles
from marginlab.geometry.store import epoch_path, save_epoch
from marginlab.head_names import HEADS

from .conftest import run_cli


def fake_run(root: Path, name: str, head: str, params: dict, seed: int, overrides: list[str]) -> Path:
    """A run directory as training leaves it: .hydra/ (config, choices, overrides) and one saved epoch."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    config = {"seed": seed, "head": {"_target_": f"marginlab.heads.{head}.Head", **params}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"head": head}}}}))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides + [f"seed={seed}"]))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, 200)
    save_epoch(
        epoch_path(run, 3),
        {
            "epoch": 3,
            "head": head,
            "features": rng.normal(size=(200, 2)).astype(np.float32),
            "labels": labels,
            "target_deg": rng.uniform(2, 12, 200),
            "weights": rng.normal(size=(10, 2)).astype(np.float32),
            "num_classes": 10,
        },
    )
    return run


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for seed in (0, 1):
        fake_run(root, f"arc{seed}", "arcface", {"s": 64.0, "m": 0.5}, seed, [])  # the head's defaults
        fake_run(root, f"cos{seed}", "cosface", {"s": 10.0, "m": 0.1}, seed, ["head=cosface", "s=10", "m=0.1"])
    return root


def test_every_shipped_head_has_its_paper_name():
    shipped = {p.stem for p in (Path(__file__).resolve().parents[1] / "marginlab/configs/head").glob("*.yaml")}
    assert shipped <= set(HEADS)


def test_titles_are_human_labels_with_the_effective_s_and_m(sweep):
    runs = sorted(p for p in sweep.iterdir())
    titles = run_titles(runs, sweep)
    assert titles[0].startswith("ArcFace (s=64, m=0.5), seed 0") and titles[3].startswith("CosFace (s=10, m=0.1)")
    assert not any("head=" in t or "m=0.1, m" in t for t in titles)


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_plot_writes_the_chosen_format_for_one_seed(sweep, capsys, fmt, magic):
    assert plot_main([str(sweep), "--seed", "1", "--format", fmt, "--width", "single"]) == 0
    out = capsys.readouterr().out
    assert "sweep of 2 run(s)" in out  # seed 1 only
    written = sorted(sweep.glob(f"*.{fmt}"))
    assert {p.stem for p in written} == {"features_grid", "features_grid_unit", "target_angles"}
    assert all(p.read_bytes().startswith(magic) for p in written)
    assert not list(sweep.glob("*.png"))


def test_plot_png_at_a_dpi_and_column_width(sweep):
    assert plot_main([str(sweep), "--dpi", "300", "--width", "double"]) == 0
    with Image.open(sweep / "target_angles.png") as img:
        assert abs(img.size[0] - 7.0 * 300) <= 2  # 7 inches at 300 dpi


@pytest.mark.parametrize("bad", [["--dpi", "0"], ["--seed", "7"], ["--format", "jpg"]])
def test_bad_plot_options_are_one_line(sweep, capfd, bad):
    assert run_cli("plot", str(sweep), *bad) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and ("invalid choice: 'jpg'" in err or err.count("\n") == 1), err
