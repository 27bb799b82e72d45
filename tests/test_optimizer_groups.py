"""build_optimizer's parameter groups: backbone, head (+ regularizers), and the class weights on their own
when the head sets ``lr_mult`` / ``weight_decay`` (NormFace's official lr_mult 100, decay_mult 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import marginlab
from marginlab.errors import ConfigError
from marginlab.heads.normface import NormFaceHead
from marginlab.training.builders import MarginModel, build_optimizer


def model_with(head: nn.Module) -> MarginModel:
    return MarginModel(nn.Linear(6, 4), head, nn.ModuleDict())


def cfg(head_weight_decay=None, lr=0.1, weight_decay=5e-4):
    optim = {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9, "weight_decay": weight_decay}
    if lr is not None:
        optim["lr"] = lr
    return OmegaConf.create({"optim": optim, "trainer": {"head_weight_decay": head_weight_decay}})


def groups(opt) -> dict[str, dict]:
    return {g["name"]: g for g in opt.param_groups}


def test_defaults_keep_two_groups():
    opt = build_optimizer(cfg(), model_with(NormFaceHead(4, 5, learnable_scale=True)))
    g = groups(opt)
    assert list(g) == ["backbone", "head"]
    assert g["head"]["lr"] == 0.1 and g["head"]["weight_decay"] == 5e-4 and len(g["head"]["params"]) == 2


def test_normface_official_recipe():
    """lr_mult 100, decay_mult 0 on the class weights; the learnt scale keeps lr 0.1 and the decay."""
    head = NormFaceHead(4, 5, learnable_scale=True, lr_mult=100.0, weight_decay=0.0)
    g = groups(build_optimizer(cfg(), model_with(head)))
    assert list(g) == ["backbone", "head", "class_weight"]
    assert g["class_weight"]["params"] == [head.weight]
    assert g["class_weight"]["lr"] == pytest.approx(10.0) and g["class_weight"]["weight_decay"] == 0.0
    assert g["head"]["params"] == [head.s] and g["head"]["lr"] == 0.1 and g["head"]["weight_decay"] == 5e-4
    assert g["backbone"]["lr"] == 0.1 and g["backbone"]["weight_decay"] == 5e-4


def test_head_weight_decay_falls_back_to_trainer_head_weight_decay():
    head = NormFaceHead(4, 5, learnable_scale=True, lr_mult=2.0)
    g = groups(build_optimizer(cfg(head_weight_decay=1e-3), model_with(head)))
    assert g["class_weight"]["weight_decay"] == 1e-3 and g["head"]["weight_decay"] == 1e-3
    assert g["class_weight"]["lr"] == pytest.approx(0.2)
    # head.weight_decay alone (lr_mult 1): a group of its own at the optimizer's lr
    head = NormFaceHead(4, 5, weight_decay=0.0)
    g = groups(build_optimizer(cfg(head_weight_decay=1e-3), model_with(head)))
    assert g["class_weight"]["weight_decay"] == 0.0 and g["class_weight"]["lr"] == 0.1
    assert "head" not in g  # nothing else in the head


def test_the_multiplier_survives_the_schedule():
    head = NormFaceHead(4, 5, lr_mult=100.0)
    opt = build_optimizer(cfg(), model_with(head))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    opt.step()
    sched.step()
    g = groups(opt)
    assert g["class_weight"]["lr"] == pytest.approx(5.0) and g["backbone"]["lr"] == pytest.approx(0.05)


def test_lr_mult_without_an_optimizer_lr_is_a_config_error():
    with pytest.raises(ConfigError, match="head.lr_mult=100 needs optim.lr"):
        build_optimizer(cfg(lr=None), model_with(NormFaceHead(4, 5, lr_mult=100.0)))


def test_normface_mnist_experiment_uses_the_official_multipliers():
    exp = OmegaConf.load(Path(marginlab.__file__).parent / "configs" / "experiment" / "normface_mnist.yaml")
    assert exp.head.lr_mult == 100.0 and exp.head.weight_decay == 0.0
