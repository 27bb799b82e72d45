"""A small CNN for the 8x8 digits default: fast on two CPU cores."""

from __future__ import annotations

from torch import Tensor, nn

from marginlab.checks import check_positive_int


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """conv(32)-conv(64)-pool-conv(128)-global pool-FC(embedding_dim)."""

    def __init__(self, embedding_dim: int = 64, in_channels: int = 1, image_size: int = 8, width: int = 32):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        w = check_positive_int("backbone.width", width)
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w),
            conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embed = nn.Linear(4 * w, self.embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))
