"""``marginlab report``: its options, and the checks on them; the help page is marginlab/report/__init__.py's
docstring, the table is built by marginlab.report."""

from __future__ import annotations

import argparse
from pathlib import Path

from marginlab.errors import ConfigError
from marginlab.report import collect, default_out, sweep_dirs
from marginlab.report.jobs import unstarted_jobs
from marginlab.report.table import Report, build_report


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="marginlab report",
        description="Join each job's config with its metrics.json into one table: a row per setting "
        "(every value that differs between the runs, seed aside; each head's effective s and m), mean ± the "
        "95% Student-t interval over seeds, each row tested against the best (paired t-test on shared seeds, "
        "else Welch; Holm-adjusted; † = not distinguishable), the paper's numbers beside ours when the "
        "experiment config has a paper: block. Writes report.md, report.csv and report.tex (booktabs). Runs "
        "that also differ in what is not compared (trainer.epochs, optim.*, dataset.*, backbone, precision, "
        "threads, versions) are refused (exit 2) unless --allow-mixed.",
    )
    p.add_argument("paths", nargs="+", help="a sweep directory, or several run/job directories")
    p.add_argument(
        "--metrics",
        help="comma-separated metrics.json keys (default: best/val/acc, best/test/acc and test/acc when the runs "
        "hold out a validation split, else test/acc; then every <set>/acc they measured); the first one picks "
        "the best row",
    )
    p.add_argument("--out", help="directory for report.md, .csv and .tex (default: the sweep directory)")
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="table runs that differ in a setting that is not compared (a starred column; marked MIXED)",
    )
    p.add_argument(
        "--axis",
        metavar="KEY[,KEY...]",
        help="keys you compare on purpose beside the head and regularizer (e.g. optim.lr, backbone): "
        "columns, not confounders",
    )
    p.add_argument(
        "--alpha", type=float, default=0.05, help="level of the tests against the best row; intervals are 1 - alpha"
    )
    p.add_argument(
        "--detect",
        type=float,
        default=0.005,
        help="the difference (in the first metric's unit) the seeds-needed hint is for (default 0.005: 0.5 points)",
    )
    return p


def refuse_mixed(report: Report, root: Path) -> None:
    """One line: which keys differ and their values, each with its run when one run holds it (the odd one out),
    else a count; then the two ways on."""

    def where(runs: list[str]) -> str:
        if len(runs) > 1:
            return f"{len(runs)} runs"
        path = Path(runs[0])
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    parts = [
        f"{key}: " + ", ".join(f"{v} ({where(runs)})" for v, runs in report.confounder_values.get(key, {}).items())
        for key in report.confounders
    ]
    raise ConfigError(
        f"report: the runs differ in {'; '.join(parts)} -- not a compared axis, so the table would credit it to "
        "the heads; pass --allow-mixed to table them anyway (marked mixed), or --axis KEY if KEY is what you compare"
    )


def main(args: list[str]) -> int:
    opts = parser().parse_args(args)
    found = collect(opts.paths)
    never_started = 0
    for sweep_dir in sweep_dirs(opts.paths):  # a stopped sweep: the jobs it never started have no directory
        planned, missing = unstarted_jobs(sweep_dir) or (0, [])
        never_started += len(missing)
        if missing:
            print(
                f"marginlab: report: {len(missing)} of {planned} planned jobs of {sweep_dir} never started "
                f"(the sweep stopped before them): {'; '.join(missing)}"
            )
    jobs = [j for j in found if not j.never_trained]  # failed before the first epoch: only a failure record
    skipped = len(found) - len(jobs)
    if skipped:
        print(
            f"marginlab: report: skipped {skipped} run dir{'s' if skipped > 1 else ''} that never trained "
            f"(failed before the first epoch; metrics.json says why)"
        )
    if not jobs:
        raise ConfigError(
            f"report: no job directories (with .hydra/) under {', '.join(opts.paths)}"
            + (f" except {skipped} that never trained" if skipped else "")
        )
    metrics = [m.strip() for m in opts.metrics.split(",") if m.strip()] if opts.metrics else None
    if not 0 < opts.alpha < 1:
        raise ConfigError(f"report: --alpha={opts.alpha!r} is not allowed: it must lie in (0, 1), e.g. 0.05")
    if not 0 < opts.detect < float("inf"):
        raise ConfigError(f"report: --detect={opts.detect!r} is not allowed: it must be a finite number > 0")
    axes = [a.strip() for a in (opts.axis or "").split(",") if a.strip()]
    out = Path(opts.out) if opts.out else default_out(opts.paths)
    root = default_out(opts.paths)
    report = build_report(jobs, metrics, root=root, axes=axes, alpha=opts.alpha, detect=opts.detect)
    if report.mixed and not opts.allow_mixed:
        refuse_mixed(report, root)
    paths = report.write(out)
    print(report.markdown())
    unstarted = f" ({never_started} planned never started)" if never_started else ""
    print(f"marginlab: report of {len(jobs)} jobs{unstarted} in {len(report.rows)} rows: {' '.join(map(str, paths))}")
    return 0
