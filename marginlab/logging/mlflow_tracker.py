"""``logger=mlflow``: the run's hyperparameters, epoch scalars, figures and checkpoints in a local MLflow store.

No server: by default the store is ``sqlite:///<outputs>/mlflow.db`` (``<outputs>``: ``$MARGINLAB_OUTPUT_DIR``,
else ``outputs``) with the artifacts under ``<outputs>/mlartifacts``; ``mlflow ui --backend-store-uri
sqlite:///outputs/mlflow.db`` shows it. (MLflow 3 refuses its old ``./mlruns`` file store unless told otherwise,
so marginlab does not default to it; ``logger.mlflow.tracking_uri`` may still name any store, a server too.)
A store that cannot be used fails the run at its start in seconds, in one line: a sqlite file is opened first
(``check_sqlite_store``), a server's first request is bounded (``FIRST_CONTACT_ENV``).

mlflow is imported only when a run asks for it (``logger.mlflow`` set); RunLog calls the same hooks as its own:
``start`` (params), ``epoch_record`` (metrics at the epoch's step), ``final`` (best/* metrics, artifacts,
FINISHED) and ``close`` (a run closed without ``final`` ends FAILED, or KILLED on Ctrl-C, its files uploaded).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from marginlab.errors import ConfigError
from marginlab.logging.hparams import flat_hparams
from marginlab.logging.tracker_options import tracker_options

MISSING = "logger=mlflow needs the mlflow extra: pip install 'marginlab[mlflow]'"
#: files uploaded at the end, (artifact folder, glob under the run dir)
ARTIFACTS = (("figures", "figures/*.png"), ("checkpoints", "checkpoints/*.pt"), ("", "metrics.json"))
_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
#: the first contact with a server (unless MLFLOW_HTTP_REQUEST_* say otherwise): one retry, 10 s a request, so a
#: store that does not answer fails the run at its start in seconds, not after MLflow's minutes of retries
FIRST_CONTACT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def outputs_root() -> Path:
    return Path(os.environ.get("MARGINLAB_OUTPUT_DIR", "outputs")).resolve()


def default_store() -> tuple[str, str]:
    """(tracking URI, artifact location) of the default local store under the outputs root."""
    root = outputs_root()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def unusable_store(uri: str, reason: str) -> ConfigError:
    default = f"sqlite:///{outputs_root() / 'mlflow.db'}"
    return ConfigError(
        f"logger.mlflow.tracking_uri: cannot use the MLflow store {uri}: {reason}; give a store that opens (a "
        f"sqlite:///<file> in a writable directory, or a running server), or null for {default}"
    )


def check_sqlite_store(uri: str) -> None:
    """A ``sqlite:///`` store must open as a database: MLflow itself retries an unusable one for ~100 s, then
    raises a traceback. A new file is created, as MLflow would."""
    import sqlite3

    path = uri[len("sqlite:///") :].split("?")[0]
    if not uri.startswith("sqlite:///") or path in ("", ":memory:"):
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
            db.execute("PRAGMA schema_version")  # opens (and reads) the file: not a directory, a database
    except (OSError, sqlite3.Error) as exc:
        raise unusable_store(uri, f"{path}: {exc}") from None


@contextlib.contextmanager
def first_contact():
    """``FIRST_CONTACT_ENV`` while the store is first reached; the variables the user set are left as they are."""
    added = {k: v for k, v in FIRST_CONTACT_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _key(name: str) -> str:
    return _BAD_KEY.sub("_", str(name))


def _number(value: Any) -> float | None:
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy scalars: plain Python numbers
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class MlflowTracker:
    """One MLflow run per marginlab run, written through ``MlflowClient`` (no global active run)."""

    def __init__(self, run_dir: Path, tracking_uri: str | None = None, experiment: str = "marginlab"):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError(MISSING) from None
        self.run_dir = Path(run_dir)
        artifact_location = None
        if not tracking_uri:
            tracking_uri, artifact_location = default_store()
        self.tracking_uri = tracking_uri
        check_sqlite_store(tracking_uri)
        try:
            with first_contact():
                self.client = MlflowClient(tracking_uri=tracking_uri)
                found = self.client.get_experiment_by_name(experiment)
        except Exception as exc:  # the store's own errors (MlflowException, sqlalchemy's, a connection's): one line
            raise unusable_store(tracking_uri, (str(exc).strip().splitlines() or [type(exc).__name__])[0]) from None
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
            except Exception:  # created meanwhile by another job of a sweep
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        self.run_id = (
            self._resumed_run(experiment_id)
            or self.client.create_run(
                experiment_id, run_name=self.run_dir.name, tags={"marginlab.run_dir": str(self.run_dir.resolve())}
            ).info.run_id
        )
        self.done = False

    def _resumed_run(self, experiment_id: str) -> str | None:
        """The MLflow run this run dir logged to before (``train resume=``), reopened; None for a new run dir."""
        run_dir = str(self.run_dir.resolve()).replace("'", "\\'")
        found = self.client.search_runs(
            [experiment_id],
            f"tags.`marginlab.run_dir` = '{run_dir}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        if not found:
            return None
        self.client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id

    @classmethod
    def from_config(cls, cfg, run_dir: Path) -> "MlflowTracker | None":
        """The tracker ``cfg.logger.mlflow`` asks for; None when it is unset (nothing imports mlflow then)."""
        options = tracker_options(cfg, "mlflow")
        if options is None:
            return None
        return cls(
            run_dir, tracking_uri=options.get("tracking_uri"), experiment=options.get("experiment") or "marginlab"
        )

    def start(self, cfg, choices: dict | None = None) -> None:
        from mlflow.entities import Param

        params = [Param(_key(k), str(v)[:6000]) for k, v in flat_hparams(cfg, choices).items()]
        for i in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def metrics(self, values: dict, step: int) -> None:
        """The numeric values at ``step`` (NaN kept, +-inf left out; bools, strings and lists are no metrics)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(_key(k), v, now, int(step))
            for k, v in ((k, _number(v)) for k, v in values.items())
            if v is not None and not math.isinf(v)
        ]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def epoch_record(self, record: dict) -> None:
        """The scalars RunLog writes to TensorBoard for the epoch, at the epoch's step."""
        self.metrics({k: v for k, v in record.items() if k not in ("epoch", "step")}, record.get("step", 0))

    def upload(self) -> None:
        for folder, pattern in ARTIFACTS:
            for path in sorted(self.run_dir.glob(pattern)):
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path), folder or None)

    def final(self, summary: dict) -> None:
        """best/* metrics, the figures, checkpoints and metrics.json as artifacts, and FINISHED."""
        self.metrics({k: v for k, v in summary.items() if k.startswith("best/")}, summary.get("steps", 0))
        self.upload()
        self.client.set_terminated(self.run_id, "FINISHED")
        self.done = True

    def close(self) -> None:
        """A run that ends without ``final`` (an error, Ctrl-C): its files so far, and FAILED (KILLED)."""
        if self.done:
            return
        self.done = True
        exc = sys.exc_info()[1]
        try:
            self.upload()
        except Exception:  # never hides the error that ended the run
            pass
        finally:
            self.client.set_terminated(self.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
