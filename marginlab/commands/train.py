"""The Hydra entry point of ``marginlab train``, kept free of torch so that ``--help``, ``--hydra-help``,
``--cfg`` and shell completion answer at Hydra's own speed; ``marginlab.training.train`` is imported by the task itself.
A plain ``--help`` does not come here: commands/help_page.py prints the same page without Hydra's group listing."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab.training import sweep  # noqa: F401  (sweep_name / job_subdir resolvers, the SweepSummary callback)


def catalog_text(group: str) -> str:
    """``--help``'s one line per head / backbone (``marginlab.help_catalog``, read only when help is printed)."""
    from marginlab.help_catalog import catalog_text as text

    return text(group)


if not OmegaConf.has_resolver("marginlab_catalog"):
    OmegaConf.register_new_resolver("marginlab_catalog", catalog_text)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    from marginlab.training.train import run

    return run(cfg)
