"""trainer.freeze_batchnorm: the backbone's BatchNorm layers kept as they are while the rest trains.

``stats`` is pytorch-metric-learning's ``freeze_trunk_batchnorm`` (trainers/base_trainer.py
``maybe_freeze_trunk_batchnorm``: every module of the trunk whose class name contains "BatchNorm" is put in eval
mode after each ``set_to_train``), which "A Metric Learning Reality Check" trains with (KevinMusgrave/
powerful-benchmarker configs/config_general/default.yaml ``freeze_trunk_batchnorm: True``): the layers normalise
with their running statistics, which no longer update, while their affine weight and bias still train. ``all``
also stops their weight and bias (requires_grad off, so the optimizer never holds them), as Proxy-Anchor's
``--bn-freeze`` and MS loss's ``freeze_bn.py`` do.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

MODES = ("none", "stats", "all")


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d / 2d / 3d, SyncBatchNorm) under ``module``."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm)]


def freeze_affine(module: nn.Module) -> None:
    """``all``: the BatchNorm layers' weight and bias stop training (before the optimizer is built)."""
    for layer in batchnorm_layers(module):
        for param in (layer.weight, layer.bias):
            if param is not None:
                param.requires_grad_(False)


def hold_statistics(module: nn.Module) -> None:
    """``stats`` / ``all``: the BatchNorm layers in eval mode, so their running statistics neither update nor
    leave the forward pass (to be applied after every ``train()``)."""
    for layer in batchnorm_layers(module):
        layer.eval()
