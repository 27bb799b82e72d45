"""The page of a plain ``marginlab train --help``, the same text Hydra prints, without Hydra's slow listing.

Hydra lists the config groups by building a fresh config repository for every group and option it asks about
(about 120 of them: ~4 s of a 2-core machine); this module reads the same sources once:

- the groups and options: the folders and ``*.yaml`` files under ``configs/`` and the non-``hydra`` groups of
  the ConfigStore (what Hydra's ``$APP_CONFIG_GROUPS`` lists for this app);
- the default config: ``train.yaml``'s defaults list merged in order, as Hydra merges it (the ConfigStore
  schema, ``_self_``, each group's default option at its group's key), printed as Hydra prints ``$CONFIG``;
- the template: the selected ``configs/hydra/help/<option>.yaml``, resolved by OmegaConf (so
  ``${marginlab_catalog:head}`` is the same resolver Hydra calls).

Whatever this reader does not cover (overrides on the command line, a ``@package`` header, a nested defaults
list, a search path, a placeholder other than ``$APP_CONFIG_GROUPS`` / ``$CONFIG``) makes ``train_help`` return
None, and Hydra prints the page itself. tests/test_cli.py checks the page equals Hydra's, character for character.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf._utils import get_yaml_loader
from omegaconf.errors import OmegaConfBaseException

import marginlab.commands.train  # noqa: F401  (the schema in the ConfigStore, the marginlab_catalog resolver)
from marginlab.help_catalog import CONFIGS

PRIMARY = "train"  # train_main.hydra_main's config_name
PLAIN_HELP = (["--help"], ["-h"])
PACKAGE_HEADER = re.compile(r"^\s*#\s*@package\b", re.MULTILINE)


class NeedsHydra(Exception):
    """Something on the page that only Hydra's own composition reads the same way."""


def is_hydra_group(group: str) -> bool:
    """Hydra's own groups, left out of ``$APP_CONFIG_GROUPS`` (hydra/_internal/hydra.py: get_help)."""
    return group == "hydra" or group.startswith("hydra/")


def file_groups(root: Path | None = None) -> dict[str, set[str]]:
    """``{group: options}`` of the folders under ``root``: every ``*.yaml`` a config, every folder a group (nested
    ones as ``a/b``), ``__pycache__`` skipped, as Hydra's package config source lists them."""
    root = CONFIGS if root is None else root
    groups: dict[str, set[str]] = {}
    for folder in sorted(p for p in root.rglob("*") if p.is_dir() and "__pycache__" not in p.parts):
        options = {p.name[: p.name.rfind(".")] for p in folder.iterdir() if p.is_file() and p.name.endswith(".yaml")}
        if options:
            groups[folder.relative_to(root).as_posix()] = options
    return groups


def store_groups() -> dict[str, set[str]]:
    """``{group: options}`` held in Hydra's ConfigStore (nodes named ``<option>.yaml`` inside nested dicts)."""
    groups: dict[str, set[str]] = {}

    def walk(node: dict, path: str) -> None:
        for name, value in node.items():
            if name.endswith(".yaml") and path:
                groups.setdefault(path, set()).add(name[: -len(".yaml")])
            elif isinstance(value, dict) and not name.endswith(".yaml"):
                walk(value, f"{path}/{name}" if path else name)

    walk(ConfigStore.instance().repo, "")
    return groups


def app_config_groups() -> str:
    """Hydra's ``$APP_CONFIG_GROUPS``: ``group: option, option`` a line, groups and options sorted."""
    groups = file_groups()
    for group, options in store_groups().items():
        groups.setdefault(group, set()).update(options)
    return "".join(
        f"{group}: {', '.join(sorted(options))}\n"
        for group, options in sorted(groups.items())
        if not is_hydra_group(group)
    )


def load_yaml(path: Path) -> dict:
    """A config file as OmegaConf.load reads it; NeedsHydra when it has a ``@package`` header or is not a mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NeedsHydra(f"{path}: {err}") from None
    if PACKAGE_HEADER.search(text):
        raise NeedsHydra(f"{path} has a @package header")
    loaded = yaml.load(text, Loader=get_yaml_loader())  # the loader of OmegaConf.load, so of Hydra
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise NeedsHydra(f"{path} is not a mapping")
    return loaded


def option_config(group: str, option: str) -> dict:
    """``configs/<group>/<option>.yaml`` of a defaults list entry; NeedsHydra when it has its own defaults list or
    the ConfigStore holds the same name (Hydra would merge the two)."""
    if f"{option}.yaml" in ConfigStore.instance().repo.get(group, {}):
        raise NeedsHydra(f"{group}/{option} is also in the ConfigStore")
    loaded = load_yaml(CONFIGS / group / f"{option}.yaml")
    if "defaults" in loaded:
        raise NeedsHydra(f"{group}/{option} has a defaults list")
    return loaded


def root_config(name: str) -> DictConfig | dict:
    """A root-level entry of the defaults list (``train_schema``): a ConfigStore node, else ``configs/<name>.yaml``."""
    node = ConfigStore.instance().repo.get(f"{name}.yaml")
    if node is not None:
        if (CONFIGS / f"{name}.yaml").exists():
            raise NeedsHydra(f"{name} is both a file and a ConfigStore node")
        return node.node
    loaded = load_yaml(CONFIGS / f"{name}.yaml")
    if "defaults" in loaded:
        raise NeedsHydra(f"{name} has a defaults list")
    return loaded


def primary_config() -> tuple[list, dict]:
    """``(defaults list, the rest)`` of ``configs/train.yaml``, ``hydra:`` left out (get_sanitized_cfg drops it)."""
    primary = load_yaml(CONFIGS / f"{PRIMARY}.yaml")
    defaults = primary.pop("defaults", None)
    if "searchpath" in (primary.pop("hydra", None) or {}):
        raise NeedsHydra(f"{PRIMARY}.yaml: hydra.searchpath adds config sources this reader does not list")
    if not isinstance(defaults, list) or "_self_" not in defaults:
        raise NeedsHydra(f"{PRIMARY}.yaml: a defaults list with _self_ is what this reader covers")
    return defaults, primary


def hydra_choices(defaults: list) -> dict[str, str]:
    """``{hydra group: option}`` the defaults list selects (``override hydra/help: marginlab``)."""
    choices = {}
    for entry in defaults:
        if isinstance(entry, dict) and len(entry) == 1:
            key, value = next(iter(entry.items()))
            group = key.removeprefix("override ").strip()
            if is_hydra_group(group):
                choices[group] = value
    return choices


def default_config(defaults: list, primary: dict) -> DictConfig:
    """The composed default config without ``hydra:`` (``primary_config()``), merged in the defaults list's order as
    Hydra does (config_loader_impl._compose_config_from_defaults_list: each entry at its package, into one)."""
    cfg = OmegaConf.create()
    for entry in defaults:
        if entry == "_self_":
            cfg.merge_with(primary)
        elif isinstance(entry, str):
            cfg.merge_with(root_config(entry))
        elif isinstance(entry, dict) and len(entry) == 1:
            key, option = next(iter(entry.items()))
            group = key.removeprefix("override ").strip()
            if is_hydra_group(group) or option is None:
                continue
            if key != group or not isinstance(option, str) or re.search(r"[@/ ]|\$\{", key + option):
                raise NeedsHydra(f"defaults entry {entry!r}")
            cfg.merge_with({group: option_config(group, option)})
        else:
            raise NeedsHydra(f"defaults entry {entry!r}")
    return cfg


def help_template(defaults: list) -> str:
    """The selected ``hydra/help`` option's template, its ``${...}`` resolved by OmegaConf."""
    option = hydra_choices(defaults).get("hydra/help")
    if not isinstance(option, str):
        raise NeedsHydra("no hydra/help option selected in the defaults list")
    node = OmegaConf.create({"hydra": {"help": load_yaml(CONFIGS / "hydra" / "help" / f"{option}.yaml")}})
    return node.hydra.help.template


def train_help(args: list[str]) -> str | None:
    """The page ``marginlab train --help`` prints (without its final newline); None when ``args`` are not a plain
    ``--help`` or the page needs Hydra's own composition."""
    if args not in PLAIN_HELP:
        return None
    try:
        defaults, primary = primary_config()
        template = string.Template(help_template(defaults))
        return template.substitute(
            APP_CONFIG_GROUPS=app_config_groups(),
            CONFIG=OmegaConf.to_yaml(default_config(defaults, primary), resolve=False),
        )
    except KeyError:  # $FLAGS_HELP or $HYDRA_CONFIG_GROUPS in the template: Hydra fills those
        return None
    except (NeedsHydra, OmegaConfBaseException, yaml.YAMLError):
        return None
