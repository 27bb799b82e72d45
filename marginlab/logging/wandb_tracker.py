"""``logger=wandb``: the run's hyperparameters, epoch scalars, best/* values and figures in a Weights & Biases run.

Offline by default (``logger.wandb.mode=offline``): no network, no login; the run is written under
``<run dir>/wandb/offline-run-*/`` and ``wandb sync <run dir>/wandb/offline-run-*`` uploads it later.
``mode=online`` logs straight to the server (after ``wandb login``), ``mode=disabled`` writes nothing.

wandb is imported only when a run asks for it (``logger.wandb`` set); RunLog calls the same hooks as for MLflow
(mlflow_tracker.py): ``start`` (the flat hyperparameters as the run's config), ``epoch_record`` (scalars at the
epoch's step), ``final`` (best/* into the summary, figures as images, exit code 0) and ``close`` (a run closed
without ``final`` ends with exit code 1, figures so far logged). The W&B run id is kept in ``<run dir>/wandb_run_id``
so ``train resume=<run dir>`` continues the same W&B run (``resume="allow"``).
"""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path

from marginlab.errors import ConfigError
from marginlab.logging.hparams import flat_hparams
from marginlab.logging.tracker_options import tracker_options

MISSING = "logger=wandb needs the wandb extra: pip install 'marginlab[wandb]'"
MODES = ("offline", "online", "disabled")
#: the file in the run dir that holds the W&B run id (``train resume=`` reads it back)
RUN_ID_FILE = "wandb_run_id"
FIGURES = "figures/*.png"


def read_run_id(path: Path) -> str:
    """The W&B run id a run kept: read back from a run directory, so untrusted; W&B names its folders by it."""
    run_id = path.read_text(errors="replace").strip()
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise ConfigError(
            f"{path}: {run_id[:80]!r} is not a W&B run id (1-64 letters, digits, '_' or '-'): the run directory was "
            f"edited; restore the file, or remove it to log the run as a new W&B run"
        )
    return run_id


def _scalars(values: dict) -> dict[str, float]:
    """The numeric values (NaN kept, +-inf left out, as in MLflow); bools, strings and lists are no metrics."""
    out = {}
    for key, value in values.items():
        if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
            value = value.item()  # numpy scalars: plain Python numbers
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value):
            out[str(key)] = value
    return out


class WandbTracker:
    """One W&B run per marginlab run dir (a resumed run dir continues it)."""

    def __init__(
        self,
        run_dir: Path,
        project: str = "marginlab",
        mode: str = "offline",
        wandb_dir: str | None = None,
        entity: str | None = None,
        tags: list | tuple = (),
    ):
        if mode not in MODES:
            raise ConfigError(f"logger.wandb.mode={mode!r} is not one of {', '.join(MODES)}")
        try:
            import wandb
        except ImportError:
            raise ConfigError(MISSING) from None
        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / RUN_ID_FILE
        run_id = read_run_id(id_file) if id_file.is_file() else secrets.token_hex(4)
        root = Path(wandb_dir) if wandb_dir else self.run_dir  # W&B writes under <root>/wandb/
        root.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                entity=entity or None,
                dir=str(root),
                mode=mode,
                id=run_id,
                resume="allow",
                name=self.run_dir.name,
                tags=[str(t) for t in tags or ()],
            )
        except wandb.errors.Error as exc:  # e.g. mode=online without `wandb login`
            raise ConfigError(f"logger.wandb (mode={mode}): {exc}") from None
        if mode != "disabled":
            id_file.write_text(run_id + "\n")
        self.step = 0
        self.done = False

    @classmethod
    def from_config(cls, cfg, run_dir: Path) -> "WandbTracker | None":
        """The tracker ``cfg.logger.wandb`` asks for; None when it is unset (nothing imports wandb then)."""
        options = tracker_options(cfg, "wandb")
        if options is None:
            return None
        return cls(
            run_dir,
            project=options.get("project") or "marginlab",
            mode=options.get("mode") or "offline",
            wandb_dir=options.get("dir"),
            entity=options.get("entity"),
            tags=list(options.get("tags") or ()),
        )

    def start(self, cfg, choices: dict | None = None) -> None:
        self.run.config.update(flat_hparams(cfg, choices), allow_val_change=True)  # a resume may change epochs

    def metrics(self, values: dict, step: int) -> None:
        self.step = max(self.step, int(step))
        self.run.log(_scalars(values), step=self.step)

    def epoch_record(self, record: dict) -> None:
        """The scalars RunLog writes to TensorBoard for the epoch, at the epoch's step."""
        self.metrics({k: v for k, v in record.items() if k not in ("epoch", "step")}, record.get("step", 0))

    def figures(self) -> None:
        """The PNGs under figures/ as images, at the last step logged."""
        images = {
            f"figures/{path.stem}": self.wandb.Image(str(path))
            for path in sorted(self.run_dir.glob(FIGURES))
            if path.is_file()
        }
        if images:
            self.run.log(images, step=self.step)

    def final(self, summary: dict) -> None:
        """best/* into the run's summary, the figures, and exit code 0."""
        self.run.summary.update(_scalars({k: v for k, v in summary.items() if k.startswith("best/")}))
        self.figures()
        self.run.finish(exit_code=0)
        self.done = True

    def close(self) -> None:
        """A run that ends without ``final`` (an error, Ctrl-C): its figures so far, and exit code 1."""
        if self.done:
            return
        self.done = True
        try:
            self.figures()
        except Exception:  # never hides the error that ended the run
            pass
        finally:
            self.run.finish(exit_code=1)
