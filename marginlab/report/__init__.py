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

import os
from pathlib import Path

from marginlab.report.jobs import MULTIRUN_FILE, Job, find_job_dirs, read_job
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
