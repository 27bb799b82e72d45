"""Each backbone maps images to (B, embedding_dim) at its data set's input size."""

from __future__ import annotations

import pytest
import torch

from marginlab.backbones.digits_cnn import DigitsCNN
from marginlab.backbones.lenet_pp import LeNetPP
from marginlab.backbones.resnet_cifar import ResNetCifar
from marginlab.backbones.torchvision_resnet import TorchvisionResNet
from marginlab.errors import ConfigError


@pytest.mark.parametrize(
    "make,shape,dim",
    [
        (lambda: DigitsCNN(embedding_dim=16, in_channels=1, image_size=8), (3, 1, 8, 8), 16),
        (lambda: LeNetPP(embedding_dim=2, in_channels=1, image_size=28), (3, 1, 28, 28), 2),
        (lambda: LeNetPP(embedding_dim=3, in_channels=1, image_size=8), (3, 1, 8, 8), 3),
        (lambda: ResNetCifar(embedding_dim=64, depth=20, in_channels=3, image_size=32), (2, 3, 32, 32), 64),
        (lambda: TorchvisionResNet("resnet18", embedding_dim=32, in_channels=3, image_size=64), (2, 3, 64, 64), 32),
        (lambda: TorchvisionResNet("resnet18", embedding_dim=8, in_channels=1, image_size=32), (2, 1, 32, 32), 8),
    ],
)
def test_output_shape(make, shape, dim):
    torch.manual_seed(0)
    net = make()
    assert net.embedding_dim == dim
    assert net(torch.randn(*shape)).shape == (shape[0], dim)


def test_resnet20_has_the_papers_depth():
    net = ResNetCifar(embedding_dim=10, depth=20)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 19  # 19 3x3 convs + the final linear layer = 20 weighted layers (He et al. 2016)
    assert 0.26e6 < sum(p.numel() for p in net.parameters()) < 0.29e6  # ~0.27M parameters


def test_resnet50_embedding():
    net = TorchvisionResNet("resnet50", embedding_dim=512)
    assert net.net.fc.out_features == 512


def test_bad_backbone_values():
    with pytest.raises(ConfigError, match="depth=21"):
        ResNetCifar(depth=21)
    with pytest.raises(ConfigError, match="arch='vgg'"):
        TorchvisionResNet(arch="vgg")
