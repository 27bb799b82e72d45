"""A dataset brings what its users start from (issue #26): ``dataset=<name>`` picks a backbone, an optimiser, a
schedule and trainer.epochs through Hydra's own defaults list (``override /backbone: ...`` in
configs/dataset/<name>.yaml). Whatever is said explicitly wins: ``backbone=`` / ``optim=`` / ``sched=`` /
``trainer.epochs=`` on the command line, or an ``experiment=``; plain ``marginlab train`` composes as before; and
``--help`` and the docs read the same picks Hydra composes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import marginlab.config  # noqa: F401  (the schema and resolvers)
from marginlab.help_catalog import CONFIGS, PICKED, dataset_picks
from marginlab.training.resume import compose_train_config

from .test_readme_margins import verdict

ROOT = Path(__file__).resolve().parents[1]
DATASETS = sorted(p.stem for p in (CONFIGS / "dataset").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
RETRIEVAL = {"backbone": "resnet50", "optim": "adamw", "sched": "cosine", "trainer.epochs": 100}
#: what each dataset picks, written out once more here so that a change to a config is a deliberate one
PICKS = {
    "digits": {"backbone": "digits_cnn", "optim": "sgd", "sched": "cosine", "trainer.epochs": 10},
    "digits_retrieval": {"backbone": "digits_cnn", "optim": "sgd", "sched": "cosine", "trainer.epochs": 10},
    "mnist": {"backbone": "lsoftmax_mnist", "optim": "sgd", "sched": "multistep", "trainer.epochs": 20},
    "cifar10": {"backbone": "resnet20", "optim": "sgd", "sched": "multistep", "trainer.epochs": 164},
    "cifar100": {"backbone": "resnet20", "optim": "sgd", "sched": "multistep", "trainer.epochs": 164},
    "imagenet": {"backbone": "resnet50", "optim": "sgd", "sched": "cosine", "trainer.epochs": 90},
    "casia": {"backbone": "iresnet50", "optim": "sgd", "sched": "multistep", "trainer.epochs": 33},
    **{name: RETRIEVAL for name in ("cub200", "cars196", "sop", "inshop")},
}


def composed(*overrides: str) -> dict:
    """The backbone / optim / sched options and trainer.epochs that ``marginlab train <overrides>`` composes."""
    with initialize_config_module("marginlab.configs", version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    return {group: cfg.hydra.runtime.choices[group] for group in PICKED} | {"trainer.epochs": cfg.trainer.epochs}


def test_every_dataset_config_has_its_picks_written_here():
    assert sorted(PICKS) == DATASETS


@pytest.mark.parametrize("name", DATASETS)
def test_a_dataset_composes_its_own_picks_and_help_reads_the_same(name):
    assert composed(f"dataset={name}") == PICKS[name]
    assert dataset_picks(name) == PICKS[name]  # what --help and the docs print is what Hydra composes


def test_plain_train_composes_as_before():
    assert composed() == PICKS["digits"]
    assert OmegaConf.to_container(compose_train_config([])) == OmegaConf.to_container(
        compose_train_config(["dataset=digits"])
    )


@pytest.mark.parametrize("dataset_first", [True, False])
def test_an_explicit_choice_on_the_command_line_wins_over_the_datasets_pick(dataset_first):
    explicit = ["backbone=resnet18", "optim=adamw", "sched=constant", "trainer.epochs=3"]
    overrides = ["dataset=cifar10", *explicit] if dataset_first else [*explicit, "dataset=cifar10"]
    assert composed(*overrides) == {"backbone": "resnet18", "optim": "adamw", "sched": "constant", "trainer.epochs": 3}
    assert composed("dataset=mnist", "backbone=lenet_pp") == PICKS["mnist"] | {"backbone": "lenet_pp"}
    assert composed("dataset=casia", "trainer.epochs=2") == PICKS["casia"] | {"trainer.epochs": 2}
    cfg = compose_train_config(["dataset=cifar10", "optim=adamw"])
    assert "momentum" not in cfg.optim  # the chosen optimiser's own config: nothing of the dataset's pick leaks


def experiment_says(name: str) -> dict:
    """The groups an experiment's defaults chain (its parent experiments first) picks, and its trainer.epochs."""
    cfg = yaml.safe_load((CONFIGS / "experiment" / f"{name}.yaml").read_text())
    said = {}
    for entry in cfg.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            said |= experiment_says(str(Path(name).parent / entry))  # relative to its group, as Hydra
        elif isinstance(entry, dict):
            said |= {k.removeprefix("override /"): v for k, v in entry.items() if k.startswith("override /")}
    if (cfg.get("trainer") or {}).get("epochs") is not None:
        said["trainer.epochs"] = cfg["trainer"]["epochs"]
    return said


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_wins_over_its_datasets_picks(name):
    said = experiment_says(name)
    dataset = said.get("dataset", "digits")
    expected = {key: said.get(key, PICKS[dataset][key]) for key in PICKS[dataset]}
    assert composed(f"experiment={name}") == expected
    assert composed(f"experiment={name}", "backbone=resnet18")["backbone"] == "resnet18"  # the command line still wins


def test_an_experiment_overrides_a_pick_of_its_dataset():
    """amsoftmax_casia trains SphereFace-20 for 16 epochs where dataset=casia alone picks IResNet-50 for 33."""
    assert composed("experiment=amsoftmax_casia")["backbone"] == "sfnet20" != PICKS["casia"]["backbone"]
    assert composed("experiment=amsoftmax_casia")["trainer.epochs"] == 16


@pytest.mark.parametrize("name", DATASETS)
def test_every_datasets_picks_validate_and_the_margin_advisor_accepts_them(name):
    assert verdict([f"dataset={name}"]) == "ok"  # the default head (AM-Softmax m 0.35) on the picked backbone


def test_help_lists_what_each_dataset_picks():
    from marginlab.commands.help_page import train_help

    page = train_help(["--help"])
    for name, picks in PICKS.items():
        line = " ".join(f"{k}={v}" for k, v in picks.items())
        assert re.search(rf"^  {name} +{re.escape(line)}$", page, re.M), name


def test_the_docs_table_of_dataset_picks_is_generated_from_the_configs():
    assert "<!-- dataset-table -->" in (ROOT / "docs" / "training.md").read_text()
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    rows = {line.split("|")[1].strip(" `"): line for line in hook.dataset_table().splitlines()[2:]}
    assert sorted(rows) == DATASETS
    for name, picks in PICKS.items():
        assert all(f"`{value}`" in rows[name] for value in picks.values()), name
    assert "He et al." in rows["cifar10"]  # the why, from the config's own comment
