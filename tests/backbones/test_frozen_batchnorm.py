"""trainer.freeze_batchnorm: the backbone's BatchNorm layers held while the rest trains, through resume.

``stats`` is pytorch-metric-learning's ``freeze_trunk_batchnorm`` (trainers/base_trainer.py, which
"A Metric Learning Reality Check" trains with): the layers in eval mode after every ``train()``, their running
statistics never updated, their weight and bias still training; ``all`` stops the weight and bias too.
"""

from __future__ import annotations

import torch
from torch import nn

from marginlab.backbones.digits_cnn import DigitsCNN
from marginlab.backbones.frozen_batchnorm import batchnorm_layers
from marginlab.training.builders import MarginModel

from ..conftest import last_weights, read_metrics, run_cli

RUN = ("logger=quiet", "trainer.epochs=2")


def batchnorm_state(weights: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Each BatchNorm layer's running statistics, batch count, weight and bias in a model state dict."""
    prefixes = [key.removesuffix("running_mean") for key in weights if key.endswith("running_mean")]
    names = ("running_mean", "running_var", "num_batches_tracked", "weight", "bias")
    return {prefix: {name: weights[prefix + name] for name in names} for prefix in prefixes}


def pretrained(run_train) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """A trunk whose BatchNorm statistics were trained (one epoch, the default none), as MLRC freezes an ImageNet
    trunk's: its run dir (for init_from=, which starts from best.pt) and best.pt's BatchNorm state."""
    code, run = run_train("logger=quiet", "trainer.epochs=1")
    assert code == 0
    weights = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    return str(run), batchnorm_state(weights)


def assert_statistics_held(weights: dict, start: dict[str, dict[str, torch.Tensor]]) -> dict:
    layers = batchnorm_state(weights)
    assert layers and layers.keys() == start.keys()  # DigitsCNN has BatchNorm after each convolution
    for prefix, layer in layers.items():
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(layer[name], start[prefix][name]), prefix + name
    return layers


def test_stats_holds_the_running_statistics_through_resume_while_the_weights_train(run_train, straight_and_resumed):
    source, start = pretrained(run_train)
    straight, split = straight_and_resumed(*RUN, f"init_from={source}", "trainer.freeze_batchnorm=stats")
    a, b = last_weights(straight), last_weights(split)
    for key in a:  # the resumed run (model.train() after the resume, each epoch) is the straight one, bit for bit
        assert torch.equal(a[key], b[key]), key
    layers = assert_statistics_held(a, start)
    # pytorch-metric-learning's freeze: the affine weight and bias still train
    assert any(not torch.equal(layer["weight"], start[prefix]["weight"]) for prefix, layer in layers.items())
    assert read_metrics(straight)["best/test/acc"] > 0.5  # the rest trained: far above chance (0.1)


def test_all_holds_the_weight_and_bias_too(run_train):
    source, start = pretrained(run_train)
    code, run = run_train(*RUN, f"init_from={source}", "trainer.freeze_batchnorm=all")
    assert code == 0
    for prefix, layer in assert_statistics_held(last_weights(run), start).items():
        assert torch.equal(layer["weight"], start[prefix]["weight"]), prefix
        assert torch.equal(layer["bias"], start[prefix]["bias"]), prefix
    assert read_metrics(run)["best/test/acc"] > 0.5


def test_none_is_the_default_and_the_statistics_train(run_train):
    code, run = run_train(*RUN)
    assert code == 0
    layers = batchnorm_state(last_weights(run))
    assert all(int(layer["num_batches_tracked"]) > 0 for layer in layers.values())


def test_train_after_eval_keeps_batchnorm_in_eval_mode_and_the_rest_training():
    model = MarginModel(DigitsCNN(embedding_dim=8, width=4), nn.Linear(8, 3), nn.ModuleDict(), freeze_batchnorm="stats")
    for _ in range(2):  # evaluation then training, as every epoch does
        model.eval()
        model.train()
        assert model.training and model.backbone.training and model.head.training
        assert all(not layer.training for layer in batchnorm_layers(model.backbone))
    assert all(p.requires_grad for p in model.parameters())  # stats: the weight and bias still train
    frozen = MarginModel(DigitsCNN(embedding_dim=8, width=4), nn.Linear(8, 3), nn.ModuleDict(), freeze_batchnorm="all")
    held = {id(p) for layer in batchnorm_layers(frozen.backbone) for p in layer.parameters()}
    assert held and all(p.requires_grad == (id(p) not in held) for p in frozen.parameters())


def test_a_backbone_without_batchnorm_or_a_bad_choice_is_refused(capsys):
    no_batchnorm = ("backbone=lenet_pp", "backbone.batch_norm=false")
    assert run_cli("train", *RUN, *no_batchnorm, "trainer.freeze_batchnorm=stats") == 2
    err = capsys.readouterr().err
    assert "trainer.freeze_batchnorm=stats" in err and "no BatchNorm layer" in err and "Traceback" not in err
    assert run_cli("train", *RUN, "trainer.freeze_batchnorm=yes") == 2
    err = capsys.readouterr().err
    assert "freeze_batchnorm" in err and "stats" in err and "Traceback" not in err
