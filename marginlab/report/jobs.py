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
from marginlab.logging.run_log import restore_nonfinite

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
    "dataset.root",
    "dataset.download",
    "trainer.device",
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

    @property
    def status(self) -> str:
        return str(self.metrics.get("status", "failed"))

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
    except (OSError, yaml.YAMLError):
        return None


def _number(value: Any) -> Any:
    """Older metrics.json files kept NaN/inf as strings; turn them back into floats."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def read_job(path: Path) -> Job:
    path = Path(path)
    hydra_dir = path / ".hydra"
    overrides = _load_yaml(hydra_dir / "overrides.yaml") or []
    config = _load_yaml(hydra_dir / "config.yaml") or {}
    hydra_cfg = (_load_yaml(hydra_dir / "hydra.yaml") or {}).get("hydra", {}) or {}
    choices = (hydra_cfg.get("runtime") or {}).get("choices") or {}
    choices = {k: v for k, v in choices.items() if not str(k).startswith("hydra/")}
    num = (hydra_cfg.get("job") or {}).get("num")
    try:
        record = restore_nonfinite(json.loads((path / "metrics.json").read_text()))
        metrics = {k: _number(v) for k, v in record.items()}
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


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
