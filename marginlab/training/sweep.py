"""Sweeps (``marginlab train -m``): where each job goes, what a failed job leaves, and the sweep's summary.

* ``outputs/sweeps/<name>/<date_time>/<overrides>/seed=<seed>/``: ``<name>`` is ``name=`` if given, else
  the experiment's name, else the hparams search's, else ``train`` (resolver ``sweep_name``); ``<overrides>`` is Hydra's
  ``override_dirname`` without seed and resume, so the seeds of one setting sit side by side
  (resolver ``job_subdir``). Both directories are created exclusively (marginlab/run_dirs.py): a name already
  taken, by an earlier sweep or one running now, becomes ``<name>-1``, ``-2``, ...; several multiruns may share
  one explicit ``hydra.sweep.dir``, and their jobs of one setting and seed get ``seed=0``, ``seed=0-1``, ...
* Values that do not compose (a value of the wrong type such as ``m=abc``, an unknown option or key) are
  checked for every job before the first starts: the sweep starts no job, and the error lists each bad value
  with its number of jobs (``error_kinds.bad_jobs``; exit 2).
* A job that fails once it runs (a value its head or the validation rejects, divergence, out of memory, a
  file the system cannot write, or a bug) writes ``{"status": "failed", "error": ...}`` to its ``metrics.json``
  and the sweep goes on (``record_failure``, called by ``marginlab.training.train.run``).
* ``SweepSummary`` (a Hydra callback, ``hydra.callbacks`` in train.yaml) counts the jobs of the sweep
  directory when the sweep ends (from their metrics.json files, so it works with any launcher; several
  multiruns sharing one ``hydra.sweep.dir`` are counted together) and the planned jobs that never started (from
  Hydra's ``multirun.yaml``: a stopped sweep), prints the count and writes ``sweep_summary.json``; the CLI turns
  ``LAST_SUMMARY`` into its exit code (1 when a job failed).
"""

from __future__ import annotations

import gc
import hashlib
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from marginlab.error_kinds import describe, is_user_error
from marginlab.errors import MarginlabError

SUMMARY_FILE = "sweep_summary.json"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
#: the summary of the last multirun in this process (the CLI reads it for the exit code)
LAST_SUMMARY: dict | None = None


class JobFailed(MarginlabError):
    """Raised by a failed job under a sweeper other than Hydra's basic one (e.g. Optuna marks the trial failed)."""


# ---------------------------------------------------------------- directories
def _safe_component(text: str) -> str:
    """One path component: no separators, at most 200 characters (a hash keeps long ones distinct)."""
    text = text.replace("/", "_").replace("\\", "_") or "_"
    if len(text) > 200:
        text = text[:180] + "-" + hashlib.sha1(text.encode()).hexdigest()[:12]
    return text


def sweep_name(name: Any, *groups: Any) -> str:
    """``name=`` (one path component: checks.check_dir_name), else the first set value of the experiment and the
    hparams search; else ``train``. Cached (use_cache) so every job of a sweep gets the value the sweep's own
    config resolved, even when a job overrides them."""
    from marginlab.checks import check_dir_name

    if name is not None:
        return _safe_component(check_dir_name("name", name))
    for value in groups:
        if value not in (None, ""):
            return _safe_component(str(value))
    return "train"


def job_subdir(override_dirname: Any, seed: Any) -> str:
    """``<overrides without seed>/seed=<seed>``; ``defaults`` when only the seed was overridden."""
    return f"{_safe_component(str(override_dirname)) if override_dirname else 'defaults'}/seed={seed}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("sweep_name"):
        OmegaConf.register_new_resolver("sweep_name", sweep_name, use_cache=True)
    if not OmegaConf.has_resolver("job_subdir"):
        OmegaConf.register_new_resolver("job_subdir", job_subdir)


register_resolvers()


# ---------------------------------------------------------------- failed jobs
def record_failure(run_dir: Path, err: BaseException, write: bool = True) -> str:
    """Prints the error, writes the failed ``metrics.json`` (and ``error.txt`` with the traceback of a bug);
    ``write=False`` only prints (a resume that failed before it started training leaves the run as it was)."""
    from marginlab.files import write_json

    message = describe(err, run_dir)
    record = {"status": "failed", "error": message, "error_type": type(err).__name__, "run_dir": str(run_dir)}
    if not is_user_error(err):
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        print(trace, file=sys.stderr, end="")
        record["traceback"] = str(run_dir / "error.txt")
    never_trained = write and not (run_dir / "metrics.jsonl").exists()  # no epoch record: its dir holds only this
    kept = (
        f" (the run never trained: {run_dir} holds only its config and this failure, in metrics.json)"
        if never_trained
        else ""
    )
    print(f"marginlab: error: {message}{kept}", file=sys.stderr)
    if not write:
        return message
    try:  # the run directory itself may be what failed (disk full, no permission)
        run_dir.mkdir(parents=True, exist_ok=True)
        if "traceback" in record:
            (run_dir / "error.txt").write_text(trace)
        write_json(run_dir / "metrics.json", record)
    except OSError as write_err:
        print(f"marginlab: error: the failure is not recorded: {describe(write_err, run_dir)}", file=sys.stderr)
    return message


def free_memory() -> None:
    """After a failed job: drop its tensors so the next job of the sweep starts with the memory free."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def failed_job_result(message: str) -> float:
    """What a failed job returns to its sweeper: NaN for Hydra's basic sweeper (which would otherwise stop
    the sweep), an exception for the others (Optuna records the trial as failed)."""
    from hydra.core.hydra_config import HydraConfig

    if str(HydraConfig.get().sweeper.get("_target_", BASIC_SWEEPER)) == BASIC_SWEEPER:
        return float("nan")
    raise JobFailed(message)


# ---------------------------------------------------------------- summary
def summarize(sweep_dir: Path) -> dict:
    """Counts the jobs under ``sweep_dir`` by the status in their metrics.json (none = failed)."""
    from marginlab.report.jobs import find_job_dirs, read_job, unstarted_jobs

    root = sweep_dir.resolve()
    jobs = [read_job(d) for d in find_job_dirs([sweep_dir])]
    failed = [j for j in jobs if j.status == "failed"]
    planned, not_started = unstarted_jobs(sweep_dir) or (None, [])
    return {
        "sweep_dir": str(sweep_dir),
        "jobs": len(jobs),
        "planned": planned,  # None: not known (another sweeper than Hydra's basic one)
        "not_started": not_started,
        "completed": sum(j.status == "completed" for j in jobs),
        "failed": len(failed),
        "other": sum(j.status not in ("completed", "failed") for j in jobs),
        "failed_jobs": [
            {
                "dir": str(j.path.relative_to(root)) if j.path.is_relative_to(root) else str(j.path),
                "overrides": j.overrides,
                "error": j.error,
            }
            for j in failed
        ],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def format_summary(summary: dict) -> str:
    not_started = summary.get("not_started") or []
    lines = [
        f"marginlab: sweep: {summary['jobs']} jobs, {summary['completed']} completed, "
        f"{summary['failed']} failed"
        + (f", {summary['other']} stopped or running" if summary["other"] else "")
        + (f", {len(not_started)} of {summary['planned']} planned never started" if not_started else "")
        + f"; {summary['sweep_dir']}"
    ]
    lines += [f"  failed: {job['dir']}: {job['error']}" for job in summary["failed_jobs"]]
    lines += [f"  not started: {overrides}" for overrides in not_started]
    if summary["jobs"]:
        lines.append(f"  table: marginlab report {summary['sweep_dir']}")
    return "\n".join(lines)


def exit_code() -> int:
    """1 when the last multirun of this process left failed jobs, else 0."""
    return 1 if LAST_SUMMARY and LAST_SUMMARY.get("failed") else 0


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, count the jobs, print the count, write sweep_summary.json."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SUMMARY
        LAST_SUMMARY = None

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global LAST_SUMMARY
        from marginlab.files import write_json

        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        summary = summarize(sweep_dir)
        write_json(sweep_dir / SUMMARY_FILE, summary)
        print(format_summary(summary), flush=True)
        LAST_SUMMARY = summary
