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

    def setting(self) -> dict[str, str]:
        """The job's overrides minus the seed (and resume, hydra.*): the key its row is grouped by."""
        out = {}
        for item in self.overrides:
            key, sep, value = item.partition("=")
            key = key.lstrip("+~")
            if not sep or key in IGNORED_KEYS or key.startswith("hydra.") or key.startswith("hydra/"):
                continue
            out[key] = value
        return out

    def value(self, key: str) -> Any:
        """A config-group choice (``head`` -> ``arcface``), the names of a group of named entries (``regularizer``
        -> ``center``, None when empty, a sorted list when several) or a dotted config value (``head.m`` -> 0.5)."""
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if "." not in key and isinstance(node, dict) and "_target_" not in node and all(
                isinstance(v, dict) for v in node.values()):
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
        metrics = {"status": "failed", "error": "no readable metrics.json (the job crashed, was killed, or is still running)"}
    return Job(path=path, overrides=[str(o) for o in overrides], metrics=metrics, config=config,
               choices=choices, num=num if isinstance(num, int) else None)


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
