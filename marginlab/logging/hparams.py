"""A run's hyperparameters as one flat dict of scalars, what TensorBoard's HParams dashboard and MLflow compare."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

#: the config sections that are hyperparameters (logger.*, verification, paper and paths are not)
SECTIONS = ("seed", "m", "s", "name", "backbone", "head", "dataset", "optim", "sched", "trainer", "regularizer")
SKIPPED = (
    "dataset.root",
    "dataset.download",
    "dataset.num_workers",
    "dataset.pin_memory",
    "trainer.device",
    "trainer.device_index",
)


def _flatten(value, key: str, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{key}.{k}" if key else str(k), out)
    elif isinstance(value, (bool, int, float, str)) and key not in SKIPPED:
        if key.endswith("._target_"):  # the class a group names: its short name
            key, value = key[: -len("._target_")], value.rsplit(".", 1)[-1]
        out[key] = value
    elif isinstance(value, (list, tuple)) and key not in SKIPPED:
        out[key] = str(list(value))


def flat_hparams(cfg: DictConfig, choices: dict | None = None) -> dict:
    """``head.m``, ``optim.lr``, ``seed``, ... (None left out); ``choices`` (Hydra's group choices, e.g.
    ``{"head": "arcface"}``) replace the class names of the groups."""
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out: dict = {}
    for section in SECTIONS:
        if section in resolved:
            _flatten(resolved[section], section, out)
    for group, choice in (choices or {}).items():
        if group in SECTIONS and isinstance(choice, str):
            out[group] = choice
    return out


def config_markdown(cfg: DictConfig) -> str:
    """The resolved config as YAML in a Markdown code block (TensorBoard's text plugin renders Markdown)."""
    return "\n".join("    " + line for line in OmegaConf.to_yaml(cfg, resolve=True).splitlines())
