"""ResNet-20 for CIFAR (He et al., CVPR 2016, section 4.2): 3 stages of 3 basic blocks, 16/32/64 channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.checks import check_positive_int
from marginlab.errors import ConfigError


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # option B projection shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with depth 6n + 2 (20, 32, 44, 56, 110); embedding from a linear layer after pooling."""

    def __init__(self, embedding_dim: int = 128, depth: int = 20, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(
                f"backbone.depth={depth!r} is not allowed: CIFAR ResNets have depth 6n+2 (20, 32, 44, 56, 110)"
            )
        n = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        blocks: list[nn.Module] = []
        cin = 16
        for i, cout in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embed = nn.Linear(64, self.embedding_dim)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.pool(self.blocks(self.stem(x))).flatten(1))
