"""MobileFaceNet (Chen, Liu, Gao, Han, CCBR 2018, Table 1): a MobileNetV2-style net for 112x112 faces.

conv3x3/2 64; depthwise conv3x3 64; bottlenecks (expansion t, channels c, repeats n, stride s)
(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1); conv1x1 512; linear
global depthwise conv (GDConv) over the whole 7x7 map; linear 1x1 conv to the embedding (128-d in the
paper). PReLU throughout, BN after every conv. A bottleneck is 1x1 expand - BN - PReLU - 3x3 depthwise -
BN - PReLU - 1x1 project - BN, with an identity shortcut when stride 1 and shapes match. As InsightFace's
``backbones/mobilefacenet.py`` the embedding layer is a bias-free linear followed by BatchNorm1d.
"""

from __future__ import annotations

from torch import Tensor, nn

from marginlab.checks import check_positive_int, image_hw

#: (expansion t, output channels c, repeats n, stride s) -- the paper's Table 1.
BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def conv_bn(cin: int, cout: int, kernel, stride: int = 1, groups: int = 1, prelu: bool = True,
            padding=None) -> nn.Sequential:
    """Conv (no bias) + BN (+ PReLU); "same" padding for odd square kernels unless ``padding`` is given."""
    padding = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if prelu:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int):
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
                                  conv_bn(hidden, cout, 1, prelu=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet producing ``embedding_dim`` features (128 in the paper, 512 in InsightFace's configs)."""

    paper_image_size = (112, 112)

    def __init__(self, embedding_dim: int = 128, in_channels: int = 3, image_size=112):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        check_positive_int("backbone.in_channels", in_channels)
        h, w = image_hw(image_size)
        layers: list[nn.Module] = [conv_bn(in_channels, 64, 3, 2), conv_bn(64, 64, 3, 1, groups=64)]
        h, w = (h + 1) // 2, (w + 1) // 2
        cin = 64
        for t, c, n, s in BOTTLENECKS:
            for i in range(n):
                layers.append(Bottleneck(cin, c, t, s if i == 0 else 1))
                cin = c
            if s == 2:
                h, w = (h + 1) // 2, (w + 1) // 2
        layers.append(conv_bn(cin, 512, 1))
        self.features = nn.Sequential(*layers)
        # linear GDConv: a depthwise kernel as large as the whole final map (7x7 at 112x112)
        self.gdc = conv_bn(512, 512, (h, w), groups=512, prelu=False, padding=0)
        self.embed = nn.Linear(512, self.embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(self.embedding_dim)
        for m in self.modules():  # InsightFace's _initialize_weights
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.embed(self.gdc(self.features(x)).flatten(1)))
