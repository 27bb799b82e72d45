"""``marginlab plot <dir> ...``: re-render a run's figures from its saved geometry, or compare a sweep's runs.

A run directory (``.hydra/`` and ``geometry/epoch_*.npz``) gets its ``figures/`` re-drawn: one
``features_epoch_XXX.png`` per saved epoch with 2-D / 3-D features, ``features_final.png`` and
``target_angles.png``. Any other directory is searched (at any depth, e.g. a Hydra multirun
``outputs/sweeps/<name>/<date_time>/<override_dirname>/``) for run directories, drawn side by side at their
last saved epoch: ``features_grid.png`` (2-D / 3-D features), ``features_grid_unit.png`` (the same on the
unit circle / sphere) and ``target_angles.png`` (every run's final target-angle distribution), each panel
titled by the overrides that differ between the runs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from marginlab.errors import DataError, MarginlabError
from marginlab.figures import FigureOutput
from marginlab.geometry.render import FIGURES_DIR, features_epoch_figure, final_features_title, target_angles_figure
from marginlab.geometry.store import has_features, latest_with_features, list_epochs, load_epoch
from marginlab.head_names import head_label

if TYPE_CHECKING:
    from marginlab.report.jobs import Job


def is_run(path: Path) -> bool:
    return (path / ".hydra").is_dir() and bool(list_epochs(path))


def find_runs(root: Path) -> list[Path]:
    """``root`` itself when it is a run directory, else every run directory below it, sorted by path."""
    if is_run(root):
        return [root]
    return sorted({p.parent for p in root.rglob("geometry") if p.is_dir() and is_run(p.parent)})


def _draw(make_figure, path: Path, written: list[Path], failed: list[str], out: FigureOutput) -> None:
    try:
        fig = make_figure()
        if fig is not None:
            written.append(out.save(fig, path))
    except MarginlabError:  # unreadable saved data: one line and exit 2 (marginlab.commands.cli)
        raise
    except Exception as exc:  # noqa: BLE001 - report and go on with the other figures
        failed.append(f"{path}: {type(exc).__name__}: {exc}")


def plot_run(run_dir: Path, out: FigureOutput = FigureOutput()) -> tuple[list[Path], list[str]]:
    """Re-renders every figure of one run from ``geometry/``; returns (written PNGs, failures)."""
    written: list[Path] = []
    failed: list[str] = []
    figures = run_dir / FIGURES_DIR
    for path in list_epochs(run_dir):
        data = load_epoch(path)
        if has_features(data):
            _draw(
                lambda: features_epoch_figure(data),
                figures / f"features_epoch_{int(data['epoch']):03d}.png",
                written,
                failed,
                out,
            )
    final = latest_with_features(run_dir)
    if final is not None:
        title = final_features_title(final)
        _draw(lambda: features_epoch_figure(final, title=title), figures / "features_final.png", written, failed, out)
    _draw(lambda: target_angles_figure(run_dir), figures / "target_angles.png", written, failed, out)
    return written, failed


def _scalar(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_label(job: Job) -> str:
    """``ArcFace (s=10, m=0.2)``: the head's paper name (+ regularizer) and the s and m it trained with, defaults
    included (from the saved config)."""
    head = job.config.get("head") if isinstance(job.config.get("head"), dict) else {}
    name = job.choices.get("head") or str(head.get("_target_", "")).rsplit(".", 1)[-1]
    params = {k: _scalar(head[k]) for k in ("s", "m") if isinstance(head.get(k), (int, float))}
    return head_label(str(name), job.choices.get("regularizer"), params)


#: overrides a title shows through ``run_label`` (or not at all), not as ``key=value``
LABELLED = ("head", "head.s", "head.m", "s", "m", "regularizer", "seed", "name")


def run_titles(runs: list[Path], root: Path, jobs: list[Job] | None = None) -> list[str]:
    """Each run's human label, then the overrides not every run shares (``key=value``), its seed when the seeds
    differ, and its test accuracy when known. ``jobs``: the runs as the report reads them (``read_job``: their
    files checked as untrusted input), read here when not given."""
    from marginlab.report import read_job
    from marginlab.training.resume import override_key

    jobs = jobs or [read_job(r) for r in runs]
    overrides = [[o for o in job.overrides if override_key(o) not in LABELLED] for job in jobs]
    shared = set.intersection(*(set(o) for o in overrides)) if len(runs) > 1 else set()
    seeds = [job.seed for job in jobs]
    titles = []
    for run, job, ovr in zip(runs, jobs, overrides):
        parts = [run_label(job)] + [o for o in ovr if o not in shared]
        if len(set(map(str, seeds))) > 1:
            parts.append(f"seed {job.seed}")
        title = textwrap.fill(", ".join(p for p in parts if p) or str(run.relative_to(root)), 44)
        acc = job.metrics.get("test/acc")
        if isinstance(acc, (int, float)):
            title += f"\ntest/acc {acc:.3f}"
        titles.append(title.replace("$", r"\$"))  # a $ from a run directory is text, not matplotlib's mathtext
    return titles


def plot_sweep(root: Path, runs: list[Path], out: FigureOutput = FigureOutput()) -> tuple[list[Path], list[str]]:
    """Draws the runs side by side at their last saved epoch into ``root``; returns (written PNGs, failures)."""
    from marginlab.figures.grid import RunPanel, features_grid_figure, target_angles_grid_figure
    from marginlab.report import read_job

    jobs = [read_job(r) for r in runs]  # each run's files read once, checked as untrusted input
    panels = []
    for run, title in zip(runs, run_titles(runs, root, jobs)):
        data = load_epoch(list_epochs(run)[-1])
        panels.append(
            RunPanel(
                title=title,
                features=data["features"] if has_features(data) else None,
                labels=data["labels"],
                target_deg=data["target_deg"],
                weights=data.get("weights"),
                class_ids=data.get("class_ids"),
                num_classes=int(data.get("num_classes", 0)) or None,
                normalized=bool(data.get("normalized", False)),
                weights_are_points=bool(data.get("weights_are_points", False)),
            )
        )
    written: list[Path] = []
    failed: list[str] = []
    from marginlab.figures.grid import sweep_name, sweep_title
    from marginlab.report.table import distinguishing_keys

    # what the sweep is: its name (not its time stamp) and the keys that differ between its runs (as in the report)
    name, varying = sweep_name(root), distinguishing_keys(jobs)
    drawn = sum(p.features is not None and p.features.shape[1] in (2, 3) for p in panels)
    if any(p.features is not None for p in panels):
        _draw(
            lambda: features_grid_figure(panels, title=sweep_title(name, varying, "features", drawn)),
            root / "features_grid.png",
            written,
            failed,
            out,
        )
        _draw(
            lambda: features_grid_figure(
                panels, unit=True, title=sweep_title(name, varying, "features on the unit circle / sphere", drawn)
            ),
            root / "features_grid_unit.png",
            written,
            failed,
            out,
        )
    _draw(
        lambda: target_angles_grid_figure(
            panels, title=sweep_title(name, varying, "target angle at the last epoch", len(panels))
        ),
        root / "target_angles.png",
        written,
        failed,
        out,
    )
    return written, failed


def main(args: list[str]) -> int:
    from marginlab.figures import COLUMN_WIDTHS, FORMATS

    parser = argparse.ArgumentParser(
        prog="marginlab plot",
        description="Re-render a run's geometry figures from <run>/geometry/, or draw the "
        "runs under a sweep directory side by side (features_grid, features_grid_unit, target_angles).",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="a run directory or a sweep directory")
    parser.add_argument(
        "--seed", type=int, action="append", metavar="N", help="only the runs of this seed (repeat for several)"
    )
    parser.add_argument("--format", choices=FORMATS, default="png", help="file format (default png)")
    parser.add_argument("--dpi", type=int, default=None, help="resolution of png output (default 80; e.g. 300)")
    parser.add_argument(
        "--width",
        choices=sorted(COLUMN_WIDTHS),
        default=None,
        help="scale each figure to a paper's column: single (%.1f in) or double (%.1f in) wide"
        % (COLUMN_WIDTHS["single"], COLUMN_WIDTHS["double"]),
    )
    opts = parser.parse_args(args)
    if opts.dpi is not None and not 10 <= opts.dpi <= 2400:
        raise DataError(f"--dpi {opts.dpi} is not allowed: give a resolution from 10 to 2400")
    out = FigureOutput(opts.format, opts.dpi, COLUMN_WIDTHS.get(opts.width))
    failures: list[str] = []
    for root in opts.dirs:
        if not root.is_dir():
            raise DataError(f"{str(root)!r} is not a directory: give a run directory or a sweep directory")
        runs = find_runs(root)
        if not runs:
            raise DataError(
                f"no run with saved geometry (.hydra/ and geometry/epoch_*.npz) under {str(root)!r}; "
                "runs save it at every evaluated epoch"
            )
        if opts.seed is not None:
            from marginlab.report import read_job

            runs = [r for r in runs if read_job(r).seed in opts.seed]
            if not runs:
                raise DataError(f"no run of seed {', '.join(map(str, opts.seed))} under {str(root)!r}")
        single = runs == [root]
        written, failed = plot_run(runs[0], out) if single else plot_sweep(root, runs, out)
        what = "run" if single else f"sweep of {len(runs)} run(s)"
        print(f"marginlab plot: {root} ({what}): {len(written)} figure(s) written")
        for path in written:
            print(f"  {path}")
        failures += failed
    for failure in failures:
        print(f"marginlab plot: warning: figure not drawn: {failure}", file=sys.stderr)
    return 1 if failures else 0
