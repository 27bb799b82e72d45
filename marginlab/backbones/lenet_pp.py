"""LeNets++ (Wen et al., ECCV 2016, center loss): the MNIST net with a small embedding to draw."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from marginlab.checks import check_positive_int


def conv_prelu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 5, padding=2), nn.PReLU(cout)]


class LeNetPP(nn.Module):
    """(5x5,32)x2, pool, (5x5,64)x2, pool, (5x5,128)x2, pool, FC embedding_dim; PReLU after each conv.

    ``batch_norm`` adds BN after each conv (as most reimplementations do; the paper has none). Every pool is
    2x2, and the feature has no activation; the official prototxt (ydwen/caffe-face mnist_example) pools 3/2
    last and puts a PReLU on the feature (experiment=center_mnist_2d lists the differences).
    """

    def __init__(self, embedding_dim: int = 2, in_channels: int = 1, image_size: int = 28, batch_norm: bool = True):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (32, 64, 128):
            for _ in range(2):
                layers.append(nn.Conv2d(cin, cout, 5, padding=2))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(cout))
                layers.append(nn.PReLU(cout))
                cin = cout
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.embed = nn.Linear(flat, self.embedding_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))
