"""Structured configs (typed dataclasses in Hydra's ConfigStore) for the fixed sections of a run.

The defaults of the top-level keys, ``trainer.*`` and ``logger.*`` are written here and only here:
configs/trainer/default.yaml and configs/logger/default.yaml select them and set nothing, and the other
options of those groups (logger/quiet.yaml, logger/mlflow.yaml, logger/wandb.yaml) hold only what they change
(tests/test_config_defaults.py keeps it so). `marginlab train --cfg job` prints the values in effect.

Group nodes with a ``_target_`` (backbone, head, dataset, optim, sched, regularizer) are typed by the
signature of the class they name; see validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


class Choice(str, Enum):
    """A setting with a fixed set of values: OmegaConf refuses any other when the config composes, naming them.

    Each name is its value, so a saved config.yaml (plain strings) loads back, and the member compares, hashes,
    prints and formats as that plain string (a str mixin with str's ``__str__``)."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def _missing_(cls, value):  # `trainer.precision=32`: Hydra parses an int, OmegaConf looks it up by value
        return cls._value2member_map_.get(str(value)) if isinstance(value, int) else None


def choice(name: str, *values: str) -> type[Choice]:
    # the functional API: a name like "32" is no identifier, and OmegaConf looks a string up by its name
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


#: trainer.precision: auto (bf16 on CUDA, 32 on CPU) | 32 | bf16 | fp16 (engine.py: Precision)
Precision = choice("Precision", "auto", "32", "bf16", "fp16")
#: trainer.best_on (train.py: selection_metric)
BestOn = choice("BestOn", "auto", "val", "test", "last")
#: trainer.device: auto (CUDA when there is one) | cpu | cuda; trainer.device_index picks the GPU (device.py)
DeviceKind = choice("DeviceKind", "auto", "cpu", "cuda")
#: trainer.freeze_batchnorm (backbones/frozen_batchnorm.py): none | stats | all
FreezeBatchNorm = choice("FreezeBatchNorm", "none", "stats", "all")


@dataclass
class TrainerConfig:
    epochs: int = 10
    stop_after_epoch: Optional[int] = None  # stop after this epoch (the schedule still spans `epochs`); resume later
    device: DeviceKind = DeviceKind.auto  # auto | cpu | cuda
    device_index: Optional[int] = None  # which GPU with device=cuda (cuda:N); null = the current one
    precision: Precision = Precision.auto  # auto (bf16 on CUDA, 32 on CPU) | 32 | bf16 | fp16 (CUDA, with GradScaler)
    channels_last: bool = True  # only applied on CUDA, where it helps convolutions
    compile: bool = False
    grad_clip: Optional[float] = None  # max global grad norm; null = off
    head_weight_decay: Optional[float] = None  # null = the optimizer's weight_decay
    eval_every_n_epochs: int = 1
    # best.pt and the sweep objective: auto (the first verification set, else val/acc, else the last epoch)
    # | val | test | last
    best_on: BestOn = BestOn.auto
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before the run stops
    checkpoint: bool = True
    deterministic: bool = False
    # torch threads (float results change with the count); null = torch's choice. The saved config and
    # metrics.json's environment.torch_threads hold the count used
    num_threads: Optional[int] = None
    strict_margin: bool = False  # true: refuse a margin C classes in embedding_dim dims cannot satisfy (else: warn)
    # the backbone's BatchNorm layers: none (they train) | stats (running statistics frozen, as
    # pytorch-metric-learning's freeze_trunk_batchnorm; the affine weight and bias train) | all (both frozen)
    freeze_batchnorm: FreezeBatchNorm = FreezeBatchNorm.none


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    progress: Optional[bool] = None  # null = tqdm only when stdout is a terminal
    log_every_n_steps: int = 10
    figures: bool = True
    probe_max_samples: int = 2048  # samples per epoch the geometry probe looks at
    console: bool = True  # one line per epoch on stdout (train.log always gets it)
    mlflow: Optional[Dict[str, Any]] = None  # logger=mlflow: {tracking_uri, experiment}; null = no MLflow run
    wandb: Optional[Dict[str, Any]] = None  # logger=wandb: {project, mode, dir, entity, tags}; null = no W&B run


@dataclass
class TrainConfig:
    seed: int = 0
    resume: Optional[str] = None  # run dir, checkpoint file, or `latest`
    init_from: Optional[str] = None  # run dir or checkpoint: a new run from its weights (backbone, head if it fits)
    init_from_head: Optional[bool] = None  # null: the head when its shapes fit; true: it must; false: never
    m: Optional[float] = None  # shorthand for head.m; a whole number reaches an integer m (L-Softmax) as int
    s: Optional[float] = None  # shorthand for head.s
    name: Optional[str] = None  # short description appended to the run directory's name
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    backbone: Any = None
    head: Any = None
    dataset: Any = None
    optim: Any = None
    sched: Any = None
    regularizer: Dict[str, Any] = field(default_factory=dict)
    verification: Dict[str, Any] = field(default_factory=dict)
    paper: Any = None
    reproduce: Any = None  # an experiment's sweeps and table steps: marginlab reproduce <name> (commands/reproduce.py)


def data_root(name: str) -> str:
    from marginlab.data.base import default_data_root

    return default_data_root(name)


def name_suffix(name: str | None) -> str:
    """``_<name>`` for the run directory when ``name`` is set (one path component: checks.check_dir_name)."""
    from marginlab.checks import check_dir_name

    return "" if name is None else f"_{check_dir_name('name', name)}"


def register_configs() -> None:
    from marginlab.run_dirs import register_resolvers

    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    register_resolvers()  # unique_dir / unique_subdir: train.yaml's run and sweep directories
    if not OmegaConf.has_resolver("data_root"):
        OmegaConf.register_new_resolver("data_root", data_root)
    if not OmegaConf.has_resolver("name_suffix"):
        OmegaConf.register_new_resolver("name_suffix", name_suffix)
