"""MobileFaceNet (Chen, Liu, Gao, Han, CCBR 2018, Table 1): a MobileNetV2-style net for 112x112 faces.

conv3x3/2 64; depthwise conv3x3 64; bottlenecks (expansion t, channels c, repeats n, stride s)
(2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1); conv1x1 512; linear
global depthwise conv (GDConv) over the whole 7x7 map; linear 1x1 conv to the embedding (128-d in the
paper). PReLU throughout, BN after every conv. A bottleneck is 1x1 expand - BN - PReLU - 3x3 depthwise -
BN - PReLU - 1x1 project - BN, with an identity shortcut when stride 1 and shapes match. As InsightFace's
``backbones/mobilefacenet.py`` the embedding layer is a bias-free linear followed by BatchNorm1d.

``width`` and ``blocks`` are InsightFace arcface_torch's ``scale`` and ``blocks`` (``get_mbf``: scale 2, blocks
(1, 4, 6, 2); ``get_mbf_large``: scale 4, blocks (2, 8, 12, 4)): ``width`` multiplies the 64/128 channels but not
the bottlenecks' hidden widths (128, 256, 512 as at width 1), the second layer is a 3x3 conv in 64 groups (a depthwise
conv at width 1) when ``blocks[0]`` is 1, else ``blocks[0]`` residual bottlenecks of hidden width 128; ``blocks[1:]``
are the repeats of the three residual stages after each stride-2 bottleneck. The defaults are the paper's net.
"""

from __future__ import annotations

from torch import Tensor, nn

from marginlab.checks import check_positive_int, image_hw
from marginlab.errors import ConfigError

#: the paper's Table 1 (and InsightFace's mbf): second layer once, then 4, 6 and 2 residual bottlenecks
PAPER_BLOCKS = (1, 4, 6, 2)
#: (hidden width, output channels at width 1) of the stride-2 bottleneck that opens each of the stages
#: ``blocks[1:]`` and of that stage's residual bottlenecks: Table 1's t * c_in, unscaled by ``width`` as InsightFace's
STAGES = (((128, 64), (128, 64)), ((256, 128), (256, 128)), ((512, 128), (256, 128)))


def conv_bn(
    cin: int, cout: int, kernel, stride: int = 1, groups: int = 1, prelu: bool = True, padding=None
) -> nn.Sequential:
    """Conv (no bias) + BN (+ PReLU); "same" padding for odd square kernels unless ``padding`` is given."""
    padding = kernel // 2 if padding is None else padding
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if prelu:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, hidden: int, stride: int):
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, cout, 1, prelu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def check_blocks(blocks) -> tuple[int, ...]:
    try:
        values = tuple(blocks)
    except TypeError:
        values = ()
    if len(values) != 4 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in values):
        raise ConfigError(
            f"backbone.blocks={blocks!r} is not allowed: it must be 4 integers >= 1, e.g. "
            f"[1, 4, 6, 2] (the paper's, InsightFace's mbf) or [2, 8, 12, 4] (InsightFace's mbf_large)"
        )
    return values


class MobileFaceNet(nn.Module):
    """MobileFaceNet producing ``embedding_dim`` features (128 in the paper, 512 in InsightFace's configs)."""

    paper_image_size = (112, 112)

    def __init__(
        self, embedding_dim: int = 128, in_channels: int = 3, image_size=112, width: int = 1, blocks=PAPER_BLOCKS
    ):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        check_positive_int("backbone.in_channels", in_channels)
        width = check_positive_int("backbone.width", width)
        self.blocks = check_blocks(blocks)
        h, w = image_hw(image_size)
        cin = 64 * width
        layers: list[nn.Module] = [conv_bn(in_channels, cin, 3, 2)]
        if self.blocks[0] == 1:  # 64 groups: a depthwise conv at width 1
            layers.append(conv_bn(cin, cin, 3, 1, groups=64))
        else:
            layers += [Bottleneck(cin, cin, 128, 1) for _ in range(self.blocks[0])]
        h, w = (h + 1) // 2, (w + 1) // 2
        for repeats, ((hidden2, c2), (hidden, c)) in zip(self.blocks[1:], STAGES):
            layers.append(Bottleneck(cin, c2 * width, hidden2, 2))
            cin = c2 * width
            layers += [Bottleneck(cin, c * width, hidden, 1) for _ in range(repeats)]
            cin = c * width
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
