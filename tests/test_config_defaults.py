"""Defaults are written once: the dataclasses in marginlab/config/schema.py hold them; the YAML files that
Hydra merges onto them set none of them again, and the other options of a group hold only what they change
(issue #17)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import marginlab
import marginlab.config  # registers the schema and resolvers
from marginlab.config.schema import LoggerConfig, TrainConfig, TrainerConfig

CONFIGS = Path(marginlab.__file__).parent / "configs"
#: group -> the schema it fills
GROUPS = {"trainer": TrainerConfig, "logger": LoggerConfig}


#: the top-level keys with a scalar default (seed, resume, m, s, ...), not the groups
TOP_LEVEL = [
    f.name for f in dataclasses.fields(TrainConfig) if f.default_factory is dataclasses.MISSING and f.type != "Any"
]


def defaults(schema) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema))


def own_keys(path: Path) -> dict:
    """The keys a YAML file sets itself (not its defaults list)."""
    node = yaml.safe_load(path.read_text()) or {}
    return {k: v for k, v in node.items() if k != "defaults"}


def test_train_yaml_sets_no_top_level_default_of_the_schema():
    restated = sorted(set(TOP_LEVEL) & set(own_keys(CONFIGS / "train.yaml")))
    assert not restated, f"train.yaml restates defaults of TrainConfig (marginlab/config/schema.py): {restated}"


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_the_default_option_only_selects_the_schema_defaults(group):
    restated = sorted(own_keys(CONFIGS / group / "default.yaml"))
    assert not restated, f"configs/{group}/default.yaml restates {restated}: set them in {GROUPS[group].__name__}"


@pytest.mark.parametrize(
    "path", sorted(p for g in GROUPS for p in (CONFIGS / g).glob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_option_sets_only_known_keys_to_other_values_than_the_default(path):
    schema = defaults(GROUPS[path.parent.name])
    for key, value in own_keys(path).items():
        assert key in schema, f"{path.parent.name}/{path.name}: {key} is not a key of the schema"
        assert value != schema[key], f"{path.parent.name}/{path.name}: {key}={value!r} restates the default"


def test_the_composed_defaults_are_the_schemas():
    with initialize_config_module("marginlab.configs", version_base="1.3"):
        cfg = compose("train")
    for group, schema in GROUPS.items():
        assert OmegaConf.to_container(cfg[group]) == defaults(schema), group
    assert {k: cfg[k] for k in TOP_LEVEL} == {k: defaults(TrainConfig)[k] for k in TOP_LEVEL}


def test_trainer_choices_read_as_the_plain_strings_of_old_configs():
    """trainer.precision and trainer.best_on are enums (issue #26); a saved config.yaml holds the plain strings,
    and every reader compares, formats and stores them as those strings."""
    from marginlab.config.schema import BestOn, Precision

    saved = OmegaConf.create({"trainer": {"precision": "32", "best_on": "test"}})  # an old run's config.yaml
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    assert cfg.trainer.precision is Precision("32") and cfg.trainer.best_on is BestOn.test
    assert cfg.trainer.precision == "32" and str(cfg.trainer.precision) == "32" and f"{cfg.trainer.best_on}" == "test"
    assert {"test": 1}[cfg.trainer.best_on] == 1
    cfg.trainer.precision = 32  # `trainer.precision=32`: Hydra parses an int
    assert cfg.trainer.precision is Precision("32")
    assert "precision: '32'" in OmegaConf.to_yaml(cfg)  # what --cfg job and .hydra/config.yaml showed before
    plain = OmegaConf.to_container(cfg.trainer, enum_to_str=True)
    assert type(plain["precision"]) is str and type(plain["best_on"]) is str
