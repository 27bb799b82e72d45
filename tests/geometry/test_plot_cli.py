"""`marginlab plot`: re-render a run's figures from its saved geometry; compare a sweep's runs in a grid."""

from __future__ import annotations

import shutil

import pytest
import yaml
from PIL import Image

from marginlab.commands.cli import main
from marginlab.commands.plot import find_runs, run_titles
from marginlab.geometry.store import list_epochs

FAST = [
    "backbone.embedding_dim=2",
    "trainer.epochs=2",
    "trainer.checkpoint=false",
    "logger.progress=false",
    "logger.tensorboard=false",
]


def assert_png(path):
    assert path.is_file() and path.stat().st_size > 1024, path
    with Image.open(path) as img:
        assert img.format == "PNG"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run of the digits default with a 2-D embedding (figures off: `plot` must draw them)."""
    out = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINLAB_OUTPUT_DIR", str(out))
        assert main(["train", *FAST, "logger.figures=false"]) == 0
    (run_dir,) = (out / "runs").iterdir()
    return run_dir


def test_figures_false_writes_no_figures_but_keeps_the_data(trained):
    assert not (trained / "figures").exists()
    assert len(list_epochs(trained)) == 2  # what `marginlab plot` draws from


def test_plot_rerenders_a_run(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "run")
    assert main(["plot", str(run_dir)]) == 0
    names = sorted(p.name for p in (run_dir / "figures").iterdir())
    assert names == ["features_epoch_001.png", "features_epoch_002.png", "features_final.png", "target_angles.png"]
    for name in names:
        assert_png(run_dir / "figures" / name)
    assert "4 figure(s) written" in capsys.readouterr().out


def make_sweep(trained, root, heads):
    """A Hydra-multirun-shaped sweep: <root>/<date_time>/<override_dirname>/ per run."""
    for head in heads:
        run_dir = shutil.copytree(trained, root / "2026-01-01_00-00-00" / f"head={head},seed=0")
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"head={head}", "seed=0"]))
        for name, edit in (
            ("hydra.yaml", lambda c: c["hydra"]["runtime"]["choices"].update(head=head)),
            ("config.yaml", lambda c: c.update(head=HEAD_CONFIGS[head])),
        ):
            saved = yaml.safe_load((run_dir / ".hydra" / name).read_text())
            edit(saved)
            (run_dir / ".hydra" / name).write_text(yaml.safe_dump(saved))
    return root


#: what a run of each head saves as its config's head node (the head's defaults)
HEAD_CONFIGS = {
    "arcface": {"_target_": "marginlab.heads.arcface.ArcFaceHead", "s": 64.0, "m": 0.5},
    "softmax": {"_target_": "marginlab.heads.softmax.SoftmaxHead"},
}


def test_plot_draws_a_grid_of_the_runs_of_a_sweep(trained, tmp_path):
    sweep = make_sweep(trained, tmp_path / "sweep", ["arcface", "softmax"])
    assert len(find_runs(sweep)) == 2
    assert main(["plot", str(sweep)]) == 0
    for name in ("features_grid.png", "features_grid_unit.png", "target_angles.png"):
        assert_png(sweep / name)
    assert not list(sweep.rglob("features_epoch_*.png"))  # a sweep gets the comparison, runs are left alone


def test_panel_titles_are_human_labels_with_the_effective_s_and_m(trained, tmp_path):
    sweep = make_sweep(trained, tmp_path / "sweep", ["arcface", "softmax"])
    titles = run_titles(find_runs(sweep), sweep)
    assert [t.splitlines()[0] for t in titles] == ["ArcFace (s=64, m=0.5)", "Softmax"]
    assert all(t.splitlines()[1].startswith("test/acc ") for t in titles)


def test_plot_of_a_directory_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no run with saved geometry" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_plot_depends_on_the_store_and_the_renderer_only():
    """``marginlab plot`` draws from disk: it loads neither the training-time probe nor torch (issue #17)."""
    import subprocess
    import sys

    code = (
        "import sys, marginlab.commands.plot, marginlab.figures.features, marginlab.figures.angles, "
        "marginlab.figures.grid\n"
        "print(sorted(m for m in sys.modules if m.startswith(('marginlab.geometry', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['marginlab.geometry', 'marginlab.geometry.render', 'marginlab.geometry.store']"


def minimal_run(root, **fields):
    """A run dir whose one saved epoch holds these fields (over four samples of 2-D features)."""
    import numpy as np

    (root / ".hydra").mkdir(parents=True)
    (root / "geometry").mkdir()
    data = {
        "epoch": 1,
        "labels": np.array([0, 1, 0, 1], np.int32),
        "target_deg": np.zeros(4, np.float32),
        "features": np.ones((4, 2), np.float32),
    }
    data.update(fields)
    np.savez(root / "geometry" / "epoch_001.npz", **{k: v for k, v in data.items() if v is not None})
    return root / "geometry" / "epoch_001.npz"


BAD_EPOCHS = {  # damage -> what the one line says
    "text": r"cannot be read: it is not an npz file \(a zip of \.npy arrays, numpy\.savez\)",
    "object": r"cannot be read: field 'head' holds pickled Python objects",
    "rows": r": field 'features' is shape \(3, 2\) float32, expected \(4, D\) numbers, one row per label",
    "2-D angles": r": field 'target_deg' is shape \(4, 2\) float64, expected \(4,\) numbers, one per label",
    "2-D labels": r": field 'labels' is shape \(4, 1\) int64, expected N integer class labels",
    "no epoch": r": no field 'epoch'",
}


@pytest.mark.parametrize("damage", sorted(BAD_EPOCHS))
def test_a_bad_saved_epoch_is_one_line_naming_the_file_and_what_was_expected(tmp_path, capsys, damage):
    """A text .npz gave numpy's allow_pickle advice, a wrong-shape field a figure failure not naming the file."""
    import re

    import numpy as np

    fields = {
        "text": {},
        "object": {"head": np.array([{"a": 1}], dtype=object)},
        "rows": {"features": np.ones((3, 2), np.float32)},
        "2-D angles": {"target_deg": np.zeros((4, 2))},
        "2-D labels": {"labels": np.zeros((4, 1), np.int64)},
        "no epoch": {"epoch": None},
    }[damage]
    path = minimal_run(tmp_path / "run", **fields)
    if damage == "text":
        path.write_text("epoch,labels\n1,0\n")
    assert main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"marginlab: error: {path}")
    assert re.search(BAD_EPOCHS[damage], err), err
    assert "allow_pickle" not in err and err.endswith(
        "delete it (the other epochs are still drawn) or re-run the training"
    )
