"""One object that writes a run's scalars to TensorBoard and its epoch records to metrics.jsonl (and, with
``logger=mlflow``, to an MLflow run: mlflow_tracker.py; ``logger=wandb``, to a W&B run: wandb_tracker.py).

Its records are strict JSON (``marginlab.files.dumps``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from marginlab.files import dumps, write_json
from marginlab.logging.epoch_line import append_to_log, format_epoch_line
from marginlab.logging.hparams import config_markdown, flat_hparams


def start_trackers(cfg, run_dir: Path, choices: dict | None = None) -> list:
    """The experiment trackers the config asks for (``logger.mlflow``: MlflowTracker, ``logger.wandb``:
    WandbTracker), each started (its hyperparameters logged); when one fails, those already started are closed."""
    from marginlab.logging.mlflow_tracker import MlflowTracker
    from marginlab.logging.wandb_tracker import WandbTracker

    trackers: list = []
    try:
        for kind in (MlflowTracker, WandbTracker):
            tracker = kind.from_config(cfg, Path(run_dir))
            if tracker is not None:
                trackers.append(tracker)
                tracker.start(cfg, choices)
    except BaseException:
        close_trackers(trackers)
        raise
    return trackers


def close_trackers(trackers: list) -> None:
    """Closes each tracker, even after another's error (not finalized: FAILED, KILLED on Ctrl-C; W&B exit code 1);
    a store's error is raised afterwards, unless an error is already on its way (it never hides that one)."""
    failing = sys.exc_info()[0] is not None
    error = None
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:
            error = error or exc
    if error is not None and not failing:
        raise error


class RunLog:
    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        enabled: bool = True,
        console: bool = True,
        trackers: list | None = None,
    ):
        """``enabled=False`` (ranks other than 0 in data-parallel runs) writes nothing at all; ``console=False``
        keeps the per-epoch line out of stdout (it still goes to train.log); ``trackers``: already started
        (``start_trackers``), else ``start`` starts those the config asks for."""
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.console = console
        self.tensorboard = tensorboard
        self.writer = None
        self.trackers: list = list(trackers or [])  # logger=mlflow / logger=wandb: MlflowTracker, WandbTracker
        self.trackers_started = trackers is not None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(prefix + tag, value, step)

    def epoch_record(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(dumps(record, sort_keys=True) + "\n")
        for tracker in self.trackers:
            tracker.epoch_record(record)

    def start(self, cfg, choices: dict | None = None) -> None:
        """TensorBoard: the resolved config as text and the hyperparameters as an HParams session of this run.

        Only the session start is written (no experiment summary, into the run's own event file, not the
        sub-run ``SummaryWriter.add_hparams`` makes per call): the dashboard then builds its columns from the
        hyperparameters of every run under ``--logdir``, so the jobs of a sweep compare side by side, and its
        metrics are the runs' scalars (``test/acc``'s last value, ``best/*`` written by ``final``).

        ``logger.mlflow`` set: an MLflow run too (mlflow_tracker.py), with the same hyperparameters as params;
        ``logger.wandb`` set: a W&B run (wandb_tracker.py), with them as its config.
        """
        if self.enabled and not self.trackers_started:
            self.trackers = start_trackers(cfg, self.run_dir, choices)
            self.trackers_started = True
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        self.writer.add_text("config", config_markdown(cfg))
        _, session_start, _ = hparams(flat_hparams(cfg, choices), {})
        self.writer.file_writer.add_summary(session_start)
        self.writer.flush()

    def epoch_line(self, record: dict, epochs: int, warnings: list[str] = ()) -> str:
        """Prints the epoch's one line (any stdout, terminal or not) and appends it to train.log."""
        line = format_epoch_line(record, epochs, warnings)
        if self.enabled:
            if self.console:
                print(line, flush=True)
            append_to_log(self.run_dir, line)
        return line

    def final(self, summary: dict) -> None:
        """metrics.json; TensorBoard: the best/* values as scalars and the HParams session's end."""
        if not self.enabled:
            return
        write_json(self.run_dir / "metrics.json", summary)
        if self.writer is not None:
            from torch.utils.tensorboard.summary import hparams

            for tag, value in summary.items():
                if tag.startswith("best/") and isinstance(value, (int, float)):
                    self.writer.add_scalar(tag, value, summary.get("steps", 0))
            self.writer.file_writer.add_summary(hparams({}, {})[2])  # session end: STATUS_SUCCESS
        for tracker in self.trackers:
            tracker.final(summary)  # best/*, figures (and checkpoints) as artifacts, FINISHED (exit code 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        trackers, self.trackers = self.trackers, []
        close_trackers(trackers)
