"""A run directory is untrusted input: the overrides marginlab reads back from one (``.hydra/overrides.yaml``,
``.hydra/resumes.yaml``) are checked before anything replays or shows them.

A resume hands those overrides to Hydra, and Hydra instantiates what they name (``hydra.callbacks.*._target_``
ran ``pathlib.Path.touch`` on resume) and resolves interpolations (``${unique_dir:...}`` creates a directory). So
an override read from a run may only set a config key or choose a config group option that marginlab ships:
never ``hydra.*``, a ``_target_`` (or another ``_..._`` key Hydra acts on, at any depth of its value), a
``${...}`` interpolation, a package (``@``), a sweep, or a ``+``-added key outside the run's schema. The rest is
refused in one line naming the file and the line. What is left still goes through the config's validation."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from marginlab.errors import ConfigError

CONFIGS = Path(__file__).parent / "configs"

RULE = (
    "a run directory is untrusted input, and what marginlab replays from it may only set config keys and "
    "choose shipped config group options (never hydra.*, _target_, ${...} interpolations, packages, sweeps or "
    "keys added outside the schema); restore the file from a copy, or start a new run"
)


@lru_cache(maxsize=None)
def config_groups() -> dict[str, frozenset[str]]:
    """Each config group marginlab ships (``configs/<group>/``, Hydra's own ``hydra/`` aside) -> its options."""
    return {
        d.name: frozenset(p.stem for p in d.glob("*.yaml"))
        for d in CONFIGS.iterdir()
        if d.is_dir() and d.name not in ("hydra", "__pycache__")
    }


@lru_cache(maxsize=None)
def schema_keys() -> frozenset[str]:
    """The top-level keys of a run's config (``TrainConfig``, config/schema.py): what a dotted override may set."""
    from dataclasses import fields

    from marginlab.config.schema import TrainConfig

    return frozenset(f.name for f in fields(TrainConfig))


def _special_key(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("_")  # _target_, _args_, _partial_, _recursive_, _convert_


def _value_refusal(value: Any) -> str | None:
    """Why a parsed override value may not be replayed: an interpolation or a key Hydra acts on, at any depth."""
    if isinstance(value, str):
        return "it holds a ${...} interpolation" if "${" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            if _special_key(k):
                return f"its value sets {k}"
            reason = _value_refusal(k) or _value_refusal(v)
            if reason:
                return reason
    if isinstance(value, list):
        return next((r for r in map(_value_refusal, value) if r), None)
    return None


def refusal(override: Any) -> str | None:
    """Why ``override`` (one entry read back from a run directory) may not be replayed; None when it may."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    if not isinstance(override, str):
        return f"not an override string but a {type(override).__name__}"
    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        return "not an override Hydra can parse"
    key = parsed.key_or_group
    parts = key.split(".")
    if parts[0] in ("hydra", "hydra/"):
        return "it sets Hydra's own configuration (hydra.*)"
    if any(_special_key(p) for p in parts):
        return f"it sets {next(p for p in parts if _special_key(p))}"
    if parsed.package is not None:
        return "it places a config with a package (@)"
    if parsed.is_sweep_override():
        return "it is a sweep, not one run's value"
    groups = config_groups()
    if len(parts) == 1 and key in groups:
        if parsed.type == OverrideType.DEL:
            return None
        value = parsed.value()
        names = value if isinstance(value, list) else [value]
        unknown = [n for n in names if n is not None and (not isinstance(n, str) or n not in groups[key])]
        return f"{key}={unknown[0]!r} is not one of the shipped {key} options" if unknown else None
    if parts[0] not in schema_keys():
        return f"{parts[0]!r} is not a key of a run's config"
    if parsed.type == OverrideType.DEL:  # ~head.lr_mult: a shipped sweep removes a head's key (validation follows)
        return None if parsed.value() is None else _value_refusal(parsed.value())
    return _value_refusal(parsed.value())


def check_overrides(items: list, path: Path, lines: list[int]) -> list[str]:
    """``items`` (read from ``path``, item i on line ``lines[i]``) when every one may be replayed, else a
    ConfigError naming the file, the line and the override."""
    for item, line in zip(items, lines):
        reason = refusal(item)
        if reason:
            raise ConfigError(f"{path}:{line}: {item!r} is refused: {reason}. {RULE.capitalize()}")
    return [str(o) for o in items]


def _item_lines(node: Any) -> list[int]:
    """The 1-based line of each item of a YAML sequence node."""
    return [item.start_mark.line + 1 for item in node.value] if isinstance(node, yaml.SequenceNode) else []


def _load(path: Path) -> tuple[Any, Any]:
    """``path`` as plain data and as a YAML node tree (for line numbers); a ConfigError naming it when unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        return yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot be read as YAML ({str(exc).splitlines()[0]}). {RULE.capitalize()}") from None


def read_override_file(path: Path) -> list[str]:
    """A run's ``.hydra/overrides.yaml``: its overrides, each checked (``refusal``)."""
    data, node = _load(path)
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: not a list of overrides but a {type(data).__name__}. {RULE.capitalize()}")
    return check_overrides(data, path, _item_lines(node))


def read_history_file(path: Path) -> list[dict]:
    """A run's ``.hydra/resumes.yaml`` (a list of entries, each with its ``overrides``), every override checked;
    a ConfigError naming the file when it is not such a list."""
    try:
        data, node = _load(path)
    except ConfigError:  # torn YAML (a kill mid-write of an older release): not a history, said the same way
        data, node = "unreadable", None
    data = [] if data is None else data
    if not isinstance(data, list) or not all(
        isinstance(e, dict) and isinstance(e.get("overrides"), list) for e in data
    ):
        raise ConfigError(
            f"{path}: not a resume history (a YAML list of entries, each with its overrides); repair its last "
            f"entry, or remove it to resume with the original command line's overrides"
        )
    for entry, entry_node in zip(data, node.value if isinstance(node, yaml.SequenceNode) else []):
        overrides_node = next(v for k, v in entry_node.value if k.value == "overrides")
        check_overrides(entry["overrides"], path, _item_lines(overrides_node))
    return data
