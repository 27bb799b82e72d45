"""Figures are pure functions from arrays to a matplotlib Figure; save_png writes a real PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from marginlab.figures import save_png
from marginlab.figures.angles import target_angle_figure
from marginlab.figures.features import features_figure
from marginlab.figures.grid import RunPanel, features_grid_figure, target_angles_grid_figure


def clusters(dim: int, n: int = 200, classes: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, n)
    feats = weights[labels] * rng.uniform(1, 3, (n, 1)) + rng.normal(scale=0.2, size=(n, dim))
    return feats.astype(np.float32), labels, weights.astype(np.float32)


def assert_png(path, min_bytes=1024):
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("normalized", [False, True])
def test_features_figure_has_the_unit_panel_only_for_normalised_heads(tmp_path, dim, normalized):
    feats, labels, weights = clusters(dim)
    fig = features_figure(feats, labels, weights, normalized=normalized, title="t")
    assert len(fig.axes) == (2 if normalized else 1)
    rgba = save_png(fig, tmp_path / "f.png")
    assert rgba.ndim == 3 and rgba.shape[2] == 4
    assert_png(tmp_path / "f.png")


def test_features_figure_draws_rbf_prototypes_and_many_classes(tmp_path):
    feats, labels, weights = clusters(2, classes=150)
    save_png(features_figure(feats, labels, weights, weights_are_points=True), tmp_path / "rbf.png")
    assert_png(tmp_path / "rbf.png")


def test_features_figure_refuses_other_dimensions():
    feats, labels, weights = clusters(5)
    with pytest.raises(ValueError, match="2-D or 3-D"):
        features_figure(feats, labels, weights)


def test_target_angle_figure_first_and_last_epoch(tmp_path):
    rng = np.random.default_rng(0)
    first = {"epoch": 1, "target_deg": rng.uniform(40, 120, 300), "other_deg": rng.uniform(60, 120, 300)}
    last = {"epoch": 30, "target_deg": rng.uniform(0, 30, 300), "other_deg": None}
    fig = target_angle_figure([first, last])
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["epoch 1: target angle", "epoch 1: nearest non-target", "epoch 30: target angle"]
    save_png(fig, tmp_path / "a.png")
    assert_png(tmp_path / "a.png")


def test_sweep_grids_skip_runs_without_drawable_features(tmp_path):
    panels = []
    for i, dim in enumerate([2, 2, 3, 16]):
        feats, labels, weights = clusters(dim, seed=i)
        panels.append(
            RunPanel(
                title=f"run {i}",
                features=feats if dim <= 3 else None,
                labels=labels,
                target_deg=np.random.default_rng(i).uniform(0, 90, len(labels)),
                weights=weights,
                normalized=i % 2 == 0,
            )
        )
    fig = features_grid_figure(panels)
    assert [ax.get_title() for ax in fig.axes] == ["run 0", "run 1", "run 2"]
    save_png(fig, tmp_path / "grid.png")
    save_png(features_grid_figure(panels, unit=True), tmp_path / "grid_unit.png")
    save_png(target_angles_grid_figure(panels), tmp_path / "angles.png")
    for name in ("grid.png", "grid_unit.png", "angles.png"):
        assert_png(tmp_path / name)
    with pytest.raises(ValueError):
        features_grid_figure(panels[3:])


def test_sweep_grid_title_names_the_sweep_and_its_varying_keys_with_labelled_axes(tmp_path):
    from marginlab.figures.grid import PANEL_SIZE, sweep_name, sweep_title

    assert sweep_name(tmp_path / "sweeps" / "margins" / "2026-12-02_08-31-51") == "margins"  # not the time stamp
    assert sweep_name(tmp_path / "sweeps" / "margins" / "2026-12-02_08-31-51-1") == "margins"
    assert sweep_name(tmp_path / "my_runs") == "my_runs"
    panels = []
    for i, dim in enumerate([2, 3]):
        feats, labels, weights = clusters(dim, seed=i)
        panels.append(RunPanel(title=f"m={i}", features=feats, labels=labels, target_deg=feats[:, 0], weights=weights))
    title = sweep_title("margins", ["head", "head.m"], "features", 2)
    assert title == "sweep margins: features of 2 runs, varying head, head.m"
    fig = features_grid_figure(panels, title=title)
    assert fig.get_suptitle() == title and fig._suptitle.get_fontsize() >= 12
    flat, deep = fig.axes
    assert (flat.get_xlabel(), flat.get_ylabel()) == ("feature dim 1", "feature dim 2")
    assert deep.get_zlabel() == "feature dim 3"
    for ax in fig.axes:  # readable at the saved size: no 7- or 8-point titles and labels
        assert ax.title.get_fontsize() >= PANEL_SIZE and ax.xaxis.label.get_fontsize() >= PANEL_SIZE
    unit = features_grid_figure(panels, unit=True, title=title)
    assert unit.axes[0].get_xlabel() == "unit feature dim 1"
    angles = target_angles_grid_figure(panels, title=title)
    assert angles.axes[0].get_title() == title and angles.axes[0].get_xlabel().startswith("target angle")


def _extents(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    return ax, ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer), fig.bbox


@pytest.mark.parametrize("which", ["run", "sweep"])
def test_angle_histograms_are_ranged_to_their_data_with_the_legend_outside(which):
    rng = np.random.default_rng(0)
    data = [rng.uniform(1.0, 9.0, 300) + i for i in range(9)]  # nine runs, all within 1-17 degrees
    if which == "run":
        fig = target_angle_figure([{"epoch": 1, "target_deg": data[0], "other_deg": data[1]}] * 2)
    else:
        panels = [
            RunPanel(title=f"ArcFace (s=10, m=0.{i})", features=None, labels=d, target_deg=d)
            for i, d in enumerate(data)
        ]
        fig = target_angles_grid_figure(panels)
    ax, axes_box, legend_box, figure_box = _extents(fig)
    lo, hi = ax.get_xlim()
    shown = np.concatenate(data[:2] if which == "run" else data)
    assert lo <= shown.min() and shown.max() <= hi  # every value is on the axis
    assert hi - lo < 2 * (shown.max() - shown.min()) + 2  # and the axis is the data's range, not 0-180
    assert not axes_box.overlaps(legend_box)  # the legend covers no histogram
    assert figure_box.contains(legend_box.x0, legend_box.y0) and figure_box.contains(legend_box.x1, legend_box.y1)


def test_class_colours_are_the_colour_blind_ten_and_the_same_in_every_panel():
    from matplotlib.colors import to_rgba

    from marginlab.figures import COLORBLIND10, class_colors, palette

    colours = class_colors(np.array([3, 0, 3]), 10)
    assert tuple(colours[0]) == to_rgba(COLORBLIND10[3]) and tuple(colours[1]) == to_rgba(COLORBLIND10[0])
    assert np.array_equal(class_colors(np.array([3]), 10)[0], colours[2])
    assert palette(3) == [to_rgba(c) for c in COLORBLIND10[:3]] and len(set(palette(12))) == 12


@pytest.mark.parametrize("which", ["epoch", "grid", "grid_unit"])
def test_the_class_legend_sits_beside_the_panels_never_over_them(which):
    feats, labels, weights = clusters(2, classes=10)
    if which == "epoch":
        fig = features_figure(feats, labels, weights, normalized=True, title="ArcFace (s=10, m=0.2), epoch 3")
    else:
        panels = [RunPanel(title=f"run {i}", features=feats, labels=labels, target_deg=feats[:, 0]) for i in range(3)]
        fig = features_grid_figure(panels, unit=which == "grid_unit", title="sweep")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert [t.get_text() for t in legend.get_texts()] == [str(c) for c in range(10)]
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)


def test_a_few_stragglers_do_not_squeeze_the_angle_histograms():
    rng = np.random.default_rng(1)
    data = [np.concatenate([rng.uniform(0.5, 9.0, 990), rng.uniform(100, 130, 3)]) for _ in range(7)]
    panels = [RunPanel(title=f"run {i}", features=None, labels=d, target_deg=d) for i, d in enumerate(data)]
    title = "sweep digits_2d_comparison: target angle at the last epoch of 7 runs, varying head, regularizer"
    fig = target_angles_grid_figure(panels, title=title)
    ax = fig.axes[0]
    assert ax.get_xlim()[1] < 30 and "central 99%" in ax.get_xlabel()  # the bulk fills the axis, said so
    assert "\n" in ax.get_title()  # wrapped to the figure's width, not cut off
    fig.canvas.draw()
    title_box = ax.title.get_window_extent(fig.canvas.get_renderer())
    assert fig.bbox.contains(title_box.x0, title_box.y0) and fig.bbox.contains(title_box.x1, title_box.y1)
