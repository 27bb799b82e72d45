"""The plain CNNs of L-Softmax's Table 1 (and NormFace's 3x3 LeNet++): shapes and layer counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

import marginlab
from marginlab.backbones.plain_cnn import PlainCNN
from marginlab.errors import ConfigError


@pytest.mark.parametrize(
    "name,channels,size,dim,convs",
    [
        ("lsoftmax_mnist", 1, 28, 256, 10),
        ("lsoftmax_cifar10", 3, 32, 256, 13),
        ("lsoftmax_cifar100", 3, 32, 512, 13),
        ("normface_lenet", 1, 28, 3, 6),
    ],
)
def test_paper_nets_shapes(name, channels, size, dim, convs):
    cfg = yaml.safe_load((Path(marginlab.__file__).parent / "configs" / "backbone" / f"{name}.yaml").read_text())
    torch.manual_seed(0)
    net = instantiate(cfg, in_channels=channels, image_size=size)
    assert net.embedding_dim == dim
    assert net(torch.randn(2, channels, size, size)).shape == (2, dim)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) == convs


def test_official_example_variant_and_small_inputs():
    net = PlainCNN(
        stages=[[64, 3], [128, 3], [256, 3]],
        embedding_dim=512,
        fc_bn_act=True,
        activation="relu",
        in_channels=1,
        image_size=8,
    )  # ceil-mode pools: 8 -> 4 -> 2 -> 1
    out = net(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 512) and (out >= 0).all()  # ends in BN + ReLU


def test_bad_values():
    with pytest.raises(ConfigError, match="activation"):
        PlainCNN(activation="tanh")
    with pytest.raises(ConfigError, match="stages"):
        PlainCNN(stages=[[64]])
