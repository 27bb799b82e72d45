"""Every ``hydra.utils.instantiate`` call lives here: config in, objects out."""

from __future__ import annotations


import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from marginlab.config.validate import check_target_node, split_head
from marginlab.distributed.partial_fc import build_partial_fc, group_rank_and_size
from marginlab.errors import ConfigError


class MarginModel(nn.Module):
    """Backbone + head (+ regularizers): images -> embeddings -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module, regularizers: nn.ModuleDict):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.regularizers = regularizers

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        embeddings = self.backbone(images)
        return embeddings, self.head(embeddings, labels)


def _instantiate(node: DictConfig, key: str, **kwargs):
    try:
        return instantiate(node, **kwargs)
    except Exception as exc:  # Hydra wraps constructor errors; surface our own message when there is one
        cause = exc
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"cannot build {key} ({node.get('_target_')}): {cause}") from exc


def build_data(cfg: DictConfig):
    return _instantiate(cfg.dataset, "dataset")


def build_head(cfg: DictConfig, in_features: int, num_classes: int, *, shard: bool = True) -> nn.Module:
    """The margin head; with ``head.partial_fc.sample_rate`` set (and ``shard``), this rank's Partial FC shard."""
    node, sample_rate = split_head(cfg.head)

    def make(num_classes: int) -> nn.Module:
        return _instantiate(node, "head", in_features=in_features, num_classes=num_classes)

    if sample_rate is None or not shard:
        return make(num_classes)
    # the shard's own random init is replaced by rows of a seeded all-classes draw (the same for any number of
    # ranks) and must not move the global random stream, which would then depend on the number of ranks
    with torch.random.fork_rng(devices=[]):
        # under torchrun the backbone is wrapped in DDP (train.py), which averages its gradients over the ranks
        return build_partial_fc(make, num_classes, sample_rate, seed=cfg.seed, init_seed=cfg.seed,
                                backbone_grads_averaged=group_rank_and_size()[1] > 1)


def build_model(cfg: DictConfig, in_channels: int, image_size: int, num_classes: int) -> MarginModel:
    backbone = _instantiate(cfg.backbone, "backbone", in_channels=in_channels, image_size=image_size)
    dim = getattr(backbone, "embedding_dim", None)
    if dim is None:
        raise ConfigError(f"backbone {cfg.backbone._target_} must expose `embedding_dim`")
    head = build_head(cfg, dim, num_classes)
    regs = nn.ModuleDict({name: _instantiate(node, f"regularizer.{name}", in_features=dim, num_classes=num_classes)
                          for name, node in (cfg.get("regularizer") or {}).items()})
    return MarginModel(backbone, head, regs)


def build_optimizer(cfg: DictConfig, model: MarginModel) -> torch.optim.Optimizer:
    """Two parameter groups: the backbone (optim.weight_decay) and head + regularizers (trainer.head_weight_decay)."""
    make = _instantiate(cfg.optim, "optim")
    head_params = [p for p in list(model.head.parameters()) + list(model.regularizers.parameters()) if p.requires_grad]
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "name": "backbone"},
              {"params": head_params, "name": "head"}]
    if cfg.trainer.head_weight_decay is not None:
        groups[1]["weight_decay"] = float(cfg.trainer.head_weight_decay)
    return make([g for g in groups if g["params"]])


def build_verifiers(nodes: DictConfig | None) -> dict:
    """``cfg.verification`` (name -> node) -> name -> VerificationTarget (lazy: nothing is read yet)."""
    verifiers = {}
    for name, node in (nodes or {}).items():
        check_target_node(f"verification.{name}", node)
        verifiers[name] = _instantiate(node, f"verification.{name}")
    return verifiers


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    schedule = _instantiate(cfg.sched, "sched", total_steps=steps_per_epoch * cfg.trainer.epochs,
                            steps_per_epoch=steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
