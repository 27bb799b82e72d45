"""A finished job as the report sees it: its overrides (``.hydra/overrides.yaml``), its config and config-group
choices (``.hydra/config.yaml``, ``.hydra/hydra.yaml``) and its ``metrics.json``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from marginlab.errors import ConfigError
from marginlab.files import restore_nonfinite

#: overrides that do not define a setting: the seeds of one setting are averaged; hydra.* only places files
IGNORED_KEYS = ("seed", "resume")

#: run management, not the experiment: never a row label (a key, or a prefix followed by "." or "/")
NOISE = (
    "hydra",
    "logger",
    "launcher",
    "hparams_search",
    "paper",
    "reproduce",
    "resume",
    "name",
    "init_from",
    "dataset.num_workers",
    "dataset.pin_memory",
    "dataset.eval_batch_size",
    "dataset.download",
    "trainer.device",
    "trainer.device_index",
    "trainer.stop_after_epoch",
    "trainer.checkpoint",
    "trainer.compile",
    "trainer.channels_last",
)

#: config groups whose choice (``head`` -> ``arcface``) can label a row, before the config's own values
CHOICE_KEYS = ("experiment", "dataset", "backbone", "head", "regularizer", "optim", "sched", "verification")


def is_noise(key: str) -> bool:
    return key in IGNORED_KEYS or any(key == n or key.startswith((n + ".", n + "/")) for n in NOISE)


def as_text(value: Any) -> str:
    """A config value as an override writes it (true, null, 0.5, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(as_text(v) for v in value) + "]"
    return str(value)


def canon(value: Any) -> str:
    """``as_text`` with numbers in one spelling (10 and 10.0 are one value: ``s=10`` saves 10.0, a config 10)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = repr(float(value))
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, list):
        return "[" + ",".join(canon(v) for v in value) + "]"
    return as_text(value)


def leaves(node: dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every value under ``node`` that is not a (non-empty) dict."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        out.update(leaves(value, name + ".") if isinstance(value, dict) and value else {name: value})
    return out


@dataclass
class Job:
    path: Path
    overrides: list[str]
    metrics: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)
    num: int | None = None  # hydra.job.num: the order of the job in its sweep
    resume_changes: list[str] = field(default_factory=list)  # settings a resume changed midway (``changed_on_resume``)
    axes: list[str] = field(default_factory=list)  # the keys its sweeper searched (hydra.sweeper.params): compared
    unreadable: list[str] = field(default_factory=list)  # ".hydra/<file>: why" for each malformed file, one line

    @property
    def status(self) -> str:
        """metrics.json's status; "stopped" for a "completed" whose epochs fall short of its config's (a resume
        extended trainer.epochs and was killed before writing its own; marginlab now removes the old summary)."""
        status = str(self.metrics.get("status", "failed"))
        planned, done = _mapping(self.config.get("trainer")).get("epochs"), self.metrics.get("epochs_done")
        if status == "completed" and isinstance(planned, int) and isinstance(done, int) and done < planned:
            return "stopped"
        return status

    @property
    def error(self) -> str | None:
        return self.metrics.get("error") if self.status == "failed" else None

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def never_trained(self) -> bool:
        """A single run that failed before its first epoch: its directory holds only the failure record (a failed
        job of a sweep stays in the report, counted in its setting's row; a run still starting is not skipped)."""
        return (
            self.status == "failed"
            and self.num is None
            and (self.path / "metrics.json").exists()
            and not (self.path / "metrics.jsonl").exists()
        )  # metrics.jsonl: a line per epoch trained

    def setting(self) -> dict[str, str]:
        """The job's overrides minus the seed and run management (``NOISE``): what its row is grouped by."""
        out = {}
        for item in self.overrides:
            key, sep, value = item.partition("=")
            key = key.lstrip("+~")
            if not sep or is_noise(key):
                continue
            out[key] = value
        return out

    def label(self, key: str) -> str | None:
        """``key``'s value in this job as text: its override when it has one, else its saved config's value (or
        config-group choice); None when neither has the key."""
        given = self.setting()
        if key in given:
            return given[key]
        value = self.value(key)
        if value is None and key not in self.choices and key.split(".")[0] not in self.config:
            return None
        return as_text(value)

    def text(self, key: str) -> str | None:
        """``key``'s value in this job as comparable text (``settings.canon``), read from its saved config first (the
        value it ran with: the shorthand ``m=`` lands in ``head.m``), else its override; ``environment.<x>`` from
        metrics.json's environment record. None when the job does not have the key, or only as an unresolved
        ``${...}``: unknown, not a difference."""
        if key.startswith("environment."):
            record = _mapping(self.metrics.get("environment"))
            name = key.partition(".")[2]
            return canon(record[name]) if name in record else None
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            text = canon(self.value(key))
            return None if "${" in text else text  # an interpolation never resolved (a config Hydra saved raw)
        if key in self.choices:
            return canon(self.choices[key])
        given = self.setting()
        return given[key] if key in given else None

    def group_keys(self) -> list[str]:
        """The config groups whose choice may label its row (``head``, ``dataset`` ...)."""
        return [k for k in CHOICE_KEYS if k in self.choices or k in self.config]

    def config_keys(self) -> list[str]:
        """Its saved config's dotted keys that may label its row (no run management, no ``_target_``)."""
        return [k for k in leaves(self.config) if not is_noise(k) and not k.endswith("._target_")]

    def value(self, key: str) -> Any:
        """A config-group choice (``head`` -> ``arcface``), the names of a group of named entries (``regularizer``
        -> ``center``, None when empty, a sorted list when several) or a dotted config value (``head.m`` -> 0.5)."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if (
            "." not in key
            and isinstance(node, dict)
            and "_target_" not in node
            and all(isinstance(v, dict) for v in node.values())
        ):
            # regularizer / verification: read from the config, since Hydra's choices miss list selections
            names = sorted(node)
            return None if not names else names[0] if len(names) == 1 else names
        if key in self.choices:
            return self.choices[key]
        return node


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


#: the .hydra files the report reads, and the YAML type each must hold
HYDRA_FILES = {"overrides.yaml": list, "config.yaml": dict, "hydra.yaml": dict}


def malformed(hydra_dir: Path) -> list[str]:
    """``.hydra/<file>: why`` for each of ``HYDRA_FILES`` that is there but not YAML of its type (one line each)."""
    problems = []
    for name, kind in HYDRA_FILES.items():
        path = hydra_dir / name
        if not path.is_file():
            continue
        try:
            value = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            problems.append(f".hydra/{name}: not readable YAML ({str(exc).splitlines()[0] if str(exc) else exc!r})")
            continue
        if not isinstance(value, kind):
            problems.append(f".hydra/{name}: holds a {type(value).__name__}, not a {kind.__name__}")
    return problems


def _number(value: Any) -> Any:
    """Older metrics.json files kept NaN/inf as strings; turn them back into floats."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _mapping(value: Any) -> dict:
    """``value`` when it is a mapping, else empty (a hand-edited or corrupted file is read as saying nothing)."""
    return value if isinstance(value, dict) else {}


#: marginlab/training/resume.py's history: each resume that trained appends the overrides it ran with
RESUMES_FILE = "resumes.yaml"


def _settings(overrides: Any) -> dict[str, str]:
    pairs = (str(o).partition("=") for o in (overrides if isinstance(overrides, list) else []))
    return {k.lstrip("+~"): v for k, sep, v in pairs if sep}


def changed_on_resume(hydra_dir: Path) -> list[str]:
    """``key: old -> new (from epoch n)`` for each setting a resume changed (resumes.yaml against the overrides
    before it): part of the run trained one way, part the other. Run management (``NOISE``) and a longer
    ``trainer.epochs`` (allowed only when the run stays exactly a run of the new length,
    marginlab/training/resume.py) aside."""
    history = _load_yaml(hydra_dir / RESUMES_FILE)
    before = _settings(_load_yaml(hydra_dir / "overrides.yaml"))
    changes = []
    for entry in history if isinstance(history, list) else []:
        after = _settings(entry.get("overrides") if isinstance(entry, dict) else None)
        changes += [
            f"{k}: {before.get(k, '<default>')} -> {after.get(k, '<default>')} (from epoch {entry.get('from_epoch')})"
            for k in sorted(before.keys() | after.keys())
            if before.get(k) != after.get(k) and not is_noise(k) and k != "trainer.epochs"
        ]
        before = after
    return changes


def last_overrides(hydra_dir: Path) -> list:
    """The overrides the job last trained with: its newest resume's (which may have changed e.g. trainer.epochs),
    else the original command line's."""
    from marginlab.replayed_overrides import read_history_file, read_override_file

    history = _load_yaml(hydra_dir / RESUMES_FILE)
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        # untrusted like every run file: what a run cannot hold is refused, naming the file and the line
        return read_history_file(hydra_dir / RESUMES_FILE)[-1].get("overrides") or []
    overrides = _load_yaml(hydra_dir / "overrides.yaml")
    return read_override_file(hydra_dir / "overrides.yaml") if isinstance(overrides, list) else []


def read_job(path: Path) -> Job:
    path = Path(path)
    hydra_dir = path / ".hydra"
    overrides = last_overrides(hydra_dir)  # a resumed run is labelled by what it trained with, not its first command
    overrides = overrides if isinstance(overrides, list) else []
    config = _mapping(_load_yaml(hydra_dir / "config.yaml"))
    hydra_cfg = _mapping(_mapping(_load_yaml(hydra_dir / "hydra.yaml")).get("hydra"))
    choices = _mapping(_mapping(hydra_cfg.get("runtime")).get("choices"))
    choices = {k: v for k, v in choices.items() if not str(k).startswith("hydra/")}
    num = _mapping(hydra_cfg.get("job")).get("num")
    searched = _mapping(_mapping(hydra_cfg.get("sweeper")).get("params"))
    try:
        record = json.loads((path / "metrics.json").read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")  # e.g. a list: read as unreadable, like a partial file
        metrics = {k: _number(v) for k, v in restore_nonfinite(record).items()}
    except (OSError, ValueError):
        metrics = {
            "status": "failed",
            "error": "no readable metrics.json (the job crashed, was killed, or is still running)",
        }
    return Job(
        path=path,
        overrides=[str(o) for o in overrides],
        metrics=metrics,
        config=config,
        choices=choices,
        num=num if isinstance(num, int) else None,
        resume_changes=changed_on_resume(hydra_dir),
        axes=[str(k) for k in searched],
        unreadable=malformed(hydra_dir),
    )


def find_job_dirs(paths: list[Path | str]) -> list[Path]:
    """Job directories: each path that holds ``.hydra/`` itself, else every directory under it that does."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ConfigError(f"report: {str(raw)!r} does not exist")
        if (path / ".hydra").is_dir():
            found.append(path)
            continue
        found.extend(sorted(p.parent for p in path.rglob(".hydra") if p.is_dir()))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


#: what Hydra writes into a sweep directory before the sweep's first job: its sweeper and command-line overrides
MULTIRUN_FILE = "multirun.yaml"


#: the most jobs a sweep plan is expanded to (a multirun.yaml is read back from a directory: untrusted)
MAX_PLANNED = 100_000


def planned_count(parsed: list) -> float:
    """How many jobs the parsed overrides of a basic sweep expand to, without expanding them (inf: unknown)."""
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    count = 1.0
    for override in parsed:
        if not override.is_sweep_override():
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep):
            count *= len(value.list)
        elif isinstance(value, RangeSweep) and value.step:
            count *= max(math.ceil((value.stop - value.start) / value.step), 0)
        else:
            return math.inf
    return count


def planned_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The overrides of every job the multirun in ``sweep_dir`` planned, expanded as Hydra's basic sweeper does
    (its ``params``, then the command line's); None when unknown: no multirun.yaml, another sweeper (Optuna decides
    as it goes), or a value only Hydra's config loader expands (``glob(...)``). Several multiruns sharing one sweep
    dir: the last one's plan (each rewrites the file)."""
    from marginlab.training.sweep import BASIC_SWEEPER

    hydra_cfg = _mapping(_mapping(_load_yaml(Path(sweep_dir) / MULTIRUN_FILE)).get("hydra"))
    sweeper = _mapping(hydra_cfg.get("sweeper"))
    task = _mapping(hydra_cfg.get("overrides")).get("task")
    if not hydra_cfg or sweeper.get("_target_") != BASIC_SWEEPER or not isinstance(task, list):
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={as_text(v)}" for k, v in _mapping(sweeper.get("params")).items()]
    try:
        parsed = OverridesParser.create().parse_overrides([*params, *(str(o) for o in task)])
        if planned_count(parsed) > MAX_PLANNED:  # a file anyone may write: range(0,10**12) is no plan to expand
            return None
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - a plan this cannot expand is unknown, not an error of the report
        return None
    return [list(job) for batch in batches for job in batch]


def unstarted_jobs(sweep_dir: Path) -> tuple[int, list[str]] | None:
    """(the number of jobs the sweep planned, the overrides of each that has no job directory: the sweep stopped
    before it, e.g. by SIGTERM); None when the plan is unknown (``planned_jobs``)."""
    planned = planned_jobs(sweep_dir)
    if planned is None:
        return None
    started: dict[tuple, int] = {}
    for job_dir in find_job_dirs([sweep_dir]):  # a job's own command line, never rewritten by its resumes
        overrides = _load_yaml(job_dir / ".hydra" / "overrides.yaml")
        key = tuple(str(o) for o in overrides) if isinstance(overrides, list) else ()
        started[key] = started.get(key, 0) + 1
    missing = []
    for job in planned:
        if started.get(tuple(job), 0) > 0:
            started[tuple(job)] -= 1
        else:
            missing.append(" ".join(job))
    return len(planned), missing


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
