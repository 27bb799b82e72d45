"""IResNet-18/34/50/100 (Duta et al. 2020 "Improved residual networks" as used by ArcFace; InsightFace
``recognition/arcface_torch/backbones/iresnet.py``): the ResNet backbone of the ArcFace/CosFace tables.

Stem 3x3 stride-1 conv 64 + BN + PReLU; four stages (64, 128, 256, 512) of blocks
BN-conv3x3-BN-PReLU-conv3x3(stride on the first block)-BN plus a (1x1 conv + BN when shapes change)
shortcut; then BN, flatten, dropout, FC to ``embedding_dim`` and BatchNorm1d ("features", its scale
fixed at 1 and frozen). Input 112x112 (7x7 after the four stride-2 stages). Initialisation as InsightFace:
convs N(0, 0.1), BN weight 1 / bias 0.
"""

from __future__ import annotations

from torch import Tensor, nn

from marginlab.checks import check_float, check_positive_int, image_hw
from marginlab.errors import ConfigError

LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


class IBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin, eps=1e-5),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout, eps=1e-5),
        )
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.body(x) + identity


class IResNet(nn.Module):
    """IResNet-``depth`` (18, 34, 50, 100) producing ``embedding_dim`` features."""

    paper_image_size = (112, 112)

    def __init__(
        self,
        embedding_dim: int = 512,
        in_channels: int = 3,
        image_size=112,
        depth: int = 50,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        check_positive_int("backbone.in_channels", in_channels)
        if depth not in LAYERS:
            raise ConfigError(f"backbone.depth={depth!r} is not allowed: choose one of {', '.join(map(str, LAYERS))}")
        p = check_float("backbone.dropout", dropout, low=0.0, high=1.0)
        h, w = image_hw(image_size)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64, eps=1e-5), nn.PReLU(64)
        )
        stages: list[nn.Module] = []
        cin = 64
        for cout, n in zip((64, 128, 256, 512), LAYERS[depth]):
            stages.append(
                nn.Sequential(*[IBasicBlock(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(n)])
            )
            cin = cout
        self.stages = nn.Sequential(*stages)
        for _ in range(4):
            h, w = (h + 1) // 2, (w + 1) // 2
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(p=p)
        self.fc = nn.Linear(512 * h * w, self.embedding_dim)
        self.features = nn.BatchNorm1d(self.embedding_dim, eps=1e-5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        if zero_init_residual:  # InsightFace zeroes bn2 (the BN before the PReLU) of every block
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.body[2].weight, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.stages(self.stem(x)))
        return self.features(self.fc(self.dropout(x.flatten(1))))
