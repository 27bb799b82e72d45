"""The Hydra entry point of ``marginlab train``, kept free of torch so that ``--help``, ``--hydra-help``,
``--cfg`` and shell completion answer at Hydra's own speed; ``marginlab.train`` is imported by the task itself."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab import sweep  # noqa: F401  (sweep_name / job_subdir resolvers, the SweepSummary callback)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    from marginlab.train import run

    return run(cfg)
