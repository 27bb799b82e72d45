"""``marginlab report <sweep dir | run dirs>``: one table of a sweep, a row per setting, beside the paper's numbers.

A job's row is set, and labelled, by the keys whose values differ between the jobs: each read from the job's
override (``.hydra/overrides.yaml``) or else its saved config (``.hydra/config.yaml``), the seed and run
management left out (``report.table.distinguishing_keys``); each metric is the mean
+- sample std over the setting's completed seeds; failed jobs are counted, never averaged. The table is
printed and written as ``report.md`` and ``report.csv`` (into the sweep dir, or ``--out``). Single runs that
failed before their first epoch (only a failure record in their directory) are skipped, with a count; the jobs a
stopped sweep planned but never started (Hydra's ``multirun.yaml``) are listed.
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
        "(the values that differ between the runs, seed aside), mean ± std over seeds, the best row "
        "marked, the paper's numbers beside ours when the experiment config has a paper: block.",
    )
    p.add_argument("paths", nargs="+", help="a sweep directory, or several run/job directories")
    p.add_argument(
        "--metrics",
        help="comma-separated metrics.json keys (default: test/acc and any <set>/acc); "
        "the first one picks the best row",
    )
    p.add_argument("--out", help="directory for report.md and report.csv (default: the sweep directory)")
    return p


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
    out = Path(opts.out) if opts.out else default_out(opts.paths)
    report = build_report(jobs, metrics, root=default_out(opts.paths))
    md, csv_path = report.write(out)
    print(report.markdown())
    unstarted = f" ({never_started} planned never started)" if never_started else ""
    print(f"marginlab: report of {len(jobs)} jobs{unstarted} in {len(report.rows)} rows: {md} {csv_path}")
    return 0
