"""One line per head and backbone for ``marginlab train --help``: what it is (paper, year), from the code itself.

Each ``configs/<group>/<option>.yaml`` names its class in ``_target_``; the line is the first sentence of that
module's docstring up to its first ": " (``ArcFace (Deng et al., CVPR 2019)``), read from the source file (its
first token), so the help imports neither torch nor the heads. Options sharing a class (cosface / amsoftmax, iresnet18 /
iresnet50) add the config values that tell them apart. Registered as the ``marginlab_catalog`` resolver that
``configs/hydra/help/marginlab.yaml`` calls.
"""

from __future__ import annotations

import ast
import functools
import inspect
import tokenize
from pathlib import Path

import yaml

PACKAGE = Path(__file__).resolve().parent
CONFIGS = PACKAGE / "configs"
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when installed: ~3x faster
GLOBAL_PACKAGE = "# @package _global_"
PICKED = ("backbone", "optim", "sched")  # the groups a dataset config picks (with trainer.epochs)


def module_docstring(path: Path) -> str:
    """The module docstring of ``path``: its first token when that is a string (``ast.get_docstring`` without
    parsing the whole file); "" when it has none."""
    with open(path, encoding="utf-8") as source:
        for token in tokenize.generate_tokens(source.readline):
            if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
                continue
            return inspect.cleandoc(ast.literal_eval(token.string)) if token.type == tokenize.STRING else ""
    return ""


@functools.cache
def module_summary(module: str) -> str:
    """``marginlab.heads.arcface`` -> ``ArcFace (Deng et al., CVPR 2019)``; "" when it has no docstring."""
    try:
        doc = module_docstring(PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py"))
    except (OSError, SyntaxError, ValueError, tokenize.TokenError):
        return ""
    first = " ".join(doc.split("\n\n")[0].split()).replace("``", "")
    return first.split(": ")[0].rstrip(".")


def leading_comment(path: Path) -> str:
    """The first sentence of the comment a config file opens with, up to its first ": " ("" without one); Hydra's
    ``# @package`` line is no part of it."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if not line.lstrip("# ").startswith("@package"):
            lines.append(line.lstrip("# ").strip())
    return " ".join(" ".join(lines).split()).split(": ")[0].rstrip(".")


def load_config(path: Path, group: str) -> dict:
    """A group option's own node: the file, or its ``<group>:`` key when the file is ``@package _global_`` (a dataset
    config that also sets trainer.epochs)."""
    text = path.read_text(encoding="utf-8")
    cfg = yaml.load(text, Loader=SafeLoader)
    if isinstance(cfg, dict) and GLOBAL_PACKAGE in text:
        cfg = cfg.get(group)
    return cfg if isinstance(cfg, dict) else {}


def option_configs(group: str) -> dict[str, dict]:
    """``{option: its yaml}`` of every ``configs/<group>/*.yaml`` that names a ``_target_``."""
    out = {}
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        cfg = load_config(path, group)
        if isinstance(cfg.get("_target_"), str):
            out[path.stem] = cfg
    return out


def train_defaults() -> dict[str, str]:
    """``{group: its default option}`` from train.yaml's defaults list."""
    train = yaml.load((CONFIGS / "train.yaml").read_text(encoding="utf-8"), Loader=SafeLoader)
    return {k: v for item in train["defaults"] if isinstance(item, dict) for k, v in item.items()}


def dataset_picks(option: str) -> dict[str, object]:
    """What ``dataset=<option>`` picks: ``{backbone, optim, sched: option, trainer.epochs: n}``, train.yaml's and
    TrainerConfig's defaults replaced by the dataset config's own ``override /<group>`` entries and trainer.epochs."""
    from marginlab.config.schema import TrainerConfig  # the dataclasses only: no torch

    defaults = train_defaults()
    picks: dict[str, object] = {group: defaults[group] for group in PICKED}
    picks["trainer.epochs"] = TrainerConfig.epochs
    text = (CONFIGS / "dataset" / f"{option}.yaml").read_text(encoding="utf-8")
    cfg = yaml.load(text, Loader=SafeLoader) or {}
    for entry in cfg.get("defaults", []):
        for key, value in entry.items() if isinstance(entry, dict) else ():
            if key.startswith("override /") and key.removeprefix("override /") in PICKED:
                picks[key.removeprefix("override /")] = value
    if GLOBAL_PACKAGE in text:  # a plain dataset config (digits) sets no trainer key
        picks["trainer.epochs"] = (cfg.get("trainer") or {}).get("epochs", picks["trainer.epochs"])
    return picks


def dataset_rows() -> list[tuple[str, str]]:
    """``[(option, "backbone=resnet20 optim=sgd sched=multistep trainer.epochs=164")]`` of every dataset config."""
    return [
        (path.stem, " ".join(f"{k}={v}" for k, v in dataset_picks(path.stem).items()))
        for path in sorted((CONFIGS / "dataset").glob("*.yaml"))
    ]


def scalar(value) -> str:
    """A config value as YAML writes it (true, null)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def catalog(group: str) -> list[tuple[str, str]]:
    """``[(option, one line)]`` of ``group``."""
    configs = option_configs(group)
    lines = []
    for option, cfg in configs.items():
        module = cfg["_target_"].rpartition(".")[0]
        line = module_summary(module)
        siblings = [c for c in configs.values() if c["_target_"] == cfg["_target_"] and c is not cfg]
        own = leading_comment(CONFIGS / group / f"{option}.yaml") if siblings else ""
        line = own or line  # one class, several papers' nets (plain_cnn: L-Softmax's, NormFace's): the file says which
        if siblings:  # the values that tell this option apart from the others on the same class
            differ = [
                k
                for k, v in cfg.items()
                if k != "_target_" and not isinstance(v, (dict, list)) and any(s.get(k) != v for s in siblings)
            ]
            if differ:
                line += " [" + ", ".join(f"{k}={scalar(cfg[k])}" for k in differ) + "]"
        lines.append((option, line))
    return lines


def catalog_text(group: str) -> str:
    """The help section of ``group``: ``  arcface        ArcFace (Deng et al., CVPR 2019)``, one option a line."""
    rows = dataset_rows() if group == "dataset" else catalog(group)  # a dataset's line: what it picks
    width = max((len(o) for o, _ in rows), default=0)
    return "\n".join(f"  {option:<{width}}  {line}".rstrip() for option, line in rows)
