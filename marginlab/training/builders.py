"""Every object made from the config is made here (``hydra.utils.instantiate``, or the head from the HeadSpec
that validation resolved): config in, objects out."""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from marginlab.backbones.frozen_batchnorm import batchnorm_layers, freeze_affine, hold_statistics
from marginlab.config.validate import HeadSpec, check_target_node
from marginlab.distributed.partial_fc import build_partial_fc, group_rank_and_size
from marginlab.errors import ConfigError
from marginlab.heads.base import MarginHead


class MarginModel(nn.Module):
    """Backbone + head (+ regularizers): images -> embeddings -> logits. ``freeze_batchnorm`` (stats / all:
    trainer.freeze_batchnorm) keeps the backbone's BatchNorm layers in eval mode through every ``train()``."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, regularizers: nn.ModuleDict, freeze_batchnorm: str = "none"
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.regularizers = regularizers
        self.freeze_batchnorm = str(freeze_batchnorm)
        if self.freeze_batchnorm == "all":
            freeze_affine(backbone)
        if self.freeze_batchnorm != "none" and self.training:
            hold_statistics(backbone)

    def train(self, mode: bool = True):
        # here, not once per epoch: whoever calls train() (each epoch, after evaluation, after a resume) gets it
        super().train(mode)
        if mode and self.freeze_batchnorm != "none":
            hold_statistics(self.backbone)
        return self

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, stats: bool = False):
        """(embeddings, the head's output); ``stats``: the step logs geometry (the head's ``forward``)."""
        embeddings = self.backbone(images)
        if labels is None:
            return embeddings, self.head(embeddings)
        return embeddings, self.head(embeddings, labels, stats=stats)


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


def build_head(spec: HeadSpec, in_features: int, num_classes: int, *, seed: int = 0, shard: bool = True) -> nn.Module:
    """The margin head ``validate`` resolved; with ``spec.sample_rate`` set (and ``shard``), this rank's Partial FC
    shard, its class weights drawn from ``seed``."""

    # a head's own ``seed`` left null (ElasticFace's margin draws) is the run's seed
    kwargs = {**spec.kwargs, "seed": seed} if "seed" in spec.kwargs and spec.kwargs["seed"] is None else spec.kwargs

    def make(num_classes: int) -> nn.Module:
        try:
            return spec.cls(**kwargs, in_features=in_features, num_classes=num_classes)
        except ConfigError:
            raise
        except Exception as exc:  # one line naming the head, not a stack trace
            raise ConfigError(f"cannot build head ({spec.cls.__module__}.{spec.name}): {exc}") from exc

    if spec.sample_rate is None or not shard:
        return make(num_classes)
    # the shard's own random init is replaced by rows of a seeded all-classes draw (the same for any number of
    # ranks) and must not move the global random stream, which would then depend on the number of ranks
    with torch.random.fork_rng(devices=[]):
        # under torchrun the backbone is wrapped in DDP (train.py), which averages its gradients over the ranks
        return build_partial_fc(
            make,
            num_classes,
            spec.sample_rate,
            seed=seed,
            init_seed=seed,
            backbone_grads_averaged=group_rank_and_size()[1] > 1,
        )


def build_model(cfg: DictConfig, in_channels: int, image_size: int, num_classes: int, *, head: HeadSpec) -> MarginModel:
    """Backbone, the head ``validate(cfg)`` returned, and the regularizers."""
    backbone = _instantiate(cfg.backbone, "backbone", in_channels=in_channels, image_size=image_size)
    dim = getattr(backbone, "embedding_dim", None)
    if dim is None:
        raise ConfigError(f"backbone {cfg.backbone._target_} must expose `embedding_dim`")
    freeze = str(cfg.trainer.freeze_batchnorm)
    if freeze != "none" and not batchnorm_layers(backbone):
        raise ConfigError(
            f"trainer.freeze_batchnorm={freeze}: backbone {cfg.backbone._target_} has no BatchNorm layer to "
            "freeze; set trainer.freeze_batchnorm=none"
        )
    model_head = build_head(head, dim, num_classes, seed=cfg.seed)  # before the regularizers: the random stream
    regs = nn.ModuleDict(
        {
            name: _instantiate(node, f"regularizer.{name}", in_features=dim, num_classes=num_classes)
            for name, node in (cfg.get("regularizer") or {}).items()
        }
    )
    return MarginModel(backbone, model_head, regs, freeze_batchnorm=freeze)


def build_optimizer(cfg: DictConfig, model: MarginModel) -> torch.optim.Optimizer:
    """Parameter groups: the backbone (optim.weight_decay); head + regularizers (trainer.head_weight_decay,
    null: optim.weight_decay); and, only when the head sets ``head.lr_mult`` != 1 or ``head.weight_decay``
    (MarginHead), its class weights W on their own ("class_weight": lr = optim.lr * lr_mult, weight decay
    head.weight_decay, null: as the head group), as a Caffe ``param { lr_mult decay_mult }`` on W would."""
    make = _instantiate(cfg.optim, "optim")
    head_wd = cfg.trainer.head_weight_decay
    # the head that owns W: model.head itself, or the one a wrapper (Partial FC) holds
    owner = next((m for m in model.head.modules() if isinstance(m, MarginHead)), None)
    own_group = owner is not None and (owner.lr_mult != 1.0 or owner.weight_decay is not None)
    class_weight = owner.weight if own_group and owner.weight.requires_grad else None
    head_params = [
        p
        for p in list(model.head.parameters()) + list(model.regularizers.parameters())
        if p.requires_grad and p is not class_weight
    ]
    groups = [
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "name": "backbone"},
        {"params": head_params, "name": "head"},
    ]
    if head_wd is not None:
        groups[1]["weight_decay"] = float(head_wd)
    if class_weight is not None:
        group = {"params": [class_weight], "name": "class_weight"}
        if owner.lr_mult != 1.0:
            if cfg.optim.get("lr") is None:
                raise ConfigError(
                    f"head.lr_mult={owner.lr_mult:g} needs optim.lr to multiply, and "
                    f"optim ({cfg.optim.get('_target_')}) sets none: set optim.lr or head.lr_mult=1"
                )
            group["lr"] = float(cfg.optim.lr) * owner.lr_mult
        decay = owner.weight_decay if owner.weight_decay is not None else head_wd
        if decay is not None:
            group["weight_decay"] = float(decay)
        groups.append(group)
    return make([g for g in groups if g["params"]])


def build_verifiers(nodes: DictConfig | None) -> dict:
    """``cfg.verification`` (name -> node) -> name -> VerificationTarget (lazy: nothing is read yet)."""
    verifiers = {}
    for name, node in (nodes or {}).items():
        check_target_node(f"verification.{name}", node)
        verifiers[name] = _instantiate(node, f"verification.{name}")
    return verifiers


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    schedule = _instantiate(
        cfg.sched, "sched", total_steps=steps_per_epoch * cfg.trainer.epochs, steps_per_epoch=steps_per_epoch
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
