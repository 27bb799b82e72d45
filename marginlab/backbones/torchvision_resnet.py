"""torchvision's ResNet-18/50 (He et al. 2016) for ImageNet-sized input, its fc layer producing the embedding."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from marginlab.checks import check_positive_int
from marginlab.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class TorchvisionResNet(nn.Module):
    """``torchvision.models.<arch>(num_classes=embedding_dim)``, randomly initialised (no download)."""

    def __init__(self, arch: str = "resnet18", embedding_dim: int = 512, in_channels: int = 3, image_size: int = 224):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"backbone.arch={arch!r} is not allowed: choose one of {', '.join(ARCHS)}")
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=self.embedding_dim)
        if in_channels != 3:
            self.net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
