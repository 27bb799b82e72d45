"""``marginlab report <sweep dir | run dirs>``: one table of a sweep, a row per setting, beside the paper's numbers.

A job's row is set, and labelled, by every key whose value differs between the jobs: each read from the job's
saved config (``.hydra/config.yaml``: the value it ran with) or else its override, the seed and run management
left out (``report.settings``). Runs that also differ in what is not compared (epochs, optimiser, data,
backbone, threads, versions) are refused unless ``--allow-mixed``. Each metric is the mean and Student-t
interval over the setting's completed seeds, each row tested against the best (``report.stats``); failed jobs
are counted, never averaged. The table is printed and written as ``report.md``, ``report.csv`` and
``report.tex`` (into the sweep dir, or ``--out``). Single runs that failed before their first epoch (only a
failure record in their directory) are skipped, with a count; the jobs a stopped sweep planned but never started
(Hydra's ``multirun.yaml``) are listed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from marginlab.errors import ConfigError
from marginlab.report.jobs import MULTIRUN_FILE, Job, find_job_dirs, read_job, unstarted_jobs
from marginlab.report.paper import PaperValue, check_paper, paper_values
from marginlab.report.table import Report, build_report

__all__ = [
    "Job",
    "PaperValue",
    "Report",
    "build_report",
    "check_paper",
    "collect",
    "find_job_dirs",
    "main",
    "paper_values",
    "read_job",
]


def _started(job: Job) -> tuple:
    """When the job started (its .hydra/overrides.yaml is written first and never again), then its number."""
    try:
        started = (job.path / ".hydra" / "overrides.yaml").stat().st_mtime
    except OSError:
        started = float("inf")
    return (started, job.num if job.num is not None else 1 << 30, str(job.path))


def collect(paths: list[str | Path]) -> list[Job]:
    """The jobs under ``paths``, in the order they ran (several multiruns into one sweep dir included)."""
    jobs: list[Job] = []
    for path in paths:
        jobs += sorted((read_job(d) for d in find_job_dirs([path])), key=_started)
    return list({j.path: j for j in jobs}.values())


def sweep_dirs(paths: list[str]) -> list[Path]:
    """The sweep directories (with Hydra's multirun.yaml) at or under ``paths``."""
    found = [p.parent for raw in paths if Path(raw).is_dir() for p in Path(raw).rglob(MULTIRUN_FILE)]
    return list(dict.fromkeys(found))


def default_out(paths: list[str]) -> Path:
    """The one directory given, else the deepest directory that holds all of them."""
    resolved = [Path(p).resolve() for p in paths]
    return resolved[0] if len(resolved) == 1 else Path(os.path.commonpath(resolved))


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
