"""SphereFace-4/10/20/36/64 (Liu et al., CVPR 2017; wy1iu/sphereface prototxts): residual CNNs without BN.

Four stages, each a 3x3 stride-2 conv (64, 128, 256, 512 channels, with bias) + PReLU followed by
residual units x + PReLU(conv(PReLU(conv(x)))) (3x3 convs; their bias is frozen at 0 in the prototxt,
so none here); then FC 512. Input 112x96 (the SphereFace alignment), 7x6 after the four stages.
Initialisation as the prototxts: Xavier (Caffe's, uniform +-sqrt(3 / fan_in)) for the stride-2 convs and
the FC, Gaussian std 0.01 for the residual convs, zero biases; PReLU slopes 0.25 per channel.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from marginlab.checks import check_positive_int, image_hw
from marginlab.errors import ConfigError

#: residual units per stage. 20: sphereface_model.prototxt; 64: Sphereface-64 prototxt (3/7/16/3, 62 convs
#: + FC -- make_spherenet.py says 3/8/16/3); 4/10/36: the paper's table, not released as prototxts.
UNITS = {4: (0, 0, 0, 0), 10: (0, 1, 2, 0), 20: (1, 2, 4, 1), 36: (2, 4, 8, 2), 64: (3, 7, 16, 3)}
WIDTHS = (64, 128, 256, 512)


def _caffe_xavier(weight) -> None:
    fan_in = weight[0].numel()
    bound = math.sqrt(3.0 / fan_in)
    nn.init.uniform_(weight, -bound, bound)


class ResidualUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
            nn.PReLU(channels),
        )
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class SphereFaceNet(nn.Module):
    """SphereFace-``depth`` (4, 10, 20, 36, 64), or any ``units`` per stage; FC to ``embedding_dim``."""

    paper_image_size = (112, 96)

    def __init__(
        self,
        embedding_dim: int = 512,
        in_channels: int = 3,
        image_size=(112, 96),
        depth: int = 20,
        units: list[int] | None = None,
    ):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        check_positive_int("backbone.in_channels", in_channels)
        h, w = image_hw(image_size)
        if units is None:
            if depth not in UNITS:
                raise ConfigError(
                    f"backbone.depth={depth!r} is not allowed: choose one of "
                    f"{', '.join(map(str, UNITS))} (or give backbone.units)"
                )
            units = UNITS[depth]
        units = list(units)
        if len(units) != 4 or any(isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in units):
            raise ConfigError(f"backbone.units={units!r} is not allowed: four integers >= 0 (units per stage)")
        stages: list[nn.Module] = []
        cin = in_channels
        for width, n in zip(WIDTHS, units):
            down = nn.Conv2d(cin, width, 3, 2, 1, bias=True)
            _caffe_xavier(down.weight)
            nn.init.zeros_(down.bias)
            stages.append(nn.Sequential(down, nn.PReLU(width), *[ResidualUnit(width) for _ in range(n)]))
            cin = width
        self.stages = nn.Sequential(*stages)
        for _ in range(4):
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, pad 1
        self.fc = nn.Linear(WIDTHS[-1] * h * w, self.embedding_dim)
        _caffe_xavier(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.stages(x).flatten(1))
