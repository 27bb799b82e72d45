"""Plain VGG-style CNNs of L-Softmax (Liu et al., ICML 2016, Table 1): 3x3 conv stages, a 2x2 max-pool after each, FC.

The same module builds NormFace's MNIST net (LeNet++ with 3x3 convs: no conv0, stages 32/64/128 x 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from marginlab.checks import check_positive_int
from marginlab.errors import ConfigError

ACTIVATIONS = {"prelu": nn.PReLU, "relu": nn.ReLU}


class PlainCNN(nn.Module):
    """[conv0] then ``stages`` of ``[channels, convs]``: each conv k x k (stride 1, same padding) + BN + activation,
    a 2x2 max-pool after each stage, then a linear layer to ``embedding_dim`` (the feature the head sees).

    ``fc_bn_act`` adds BN + activation after that linear layer, as the official L-Softmax Caffe examples do
    (their ``ip1`` -> ``bn_ip`` -> ``relu_ip``); the paper's Table 1 lists only the FC layer.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = ((64, 3), (64, 3), (64, 3)),
        conv0: int | None = 64,
        embedding_dim: int = 256,
        kernel_size: int = 3,
        batch_norm: bool = True,
        activation: str = "prelu",
        fc_bn_act: bool = False,
        in_channels: int = 1,
        image_size: int = 28,
    ):
        super().__init__()
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        k = check_positive_int("backbone.kernel_size", kernel_size)
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"backbone.activation={activation!r} is not allowed: choose one of {', '.join(ACTIVATIONS)}"
            )
        stages = [list(s) for s in stages]
        if not stages or any(len(s) != 2 for s in stages):
            raise ConfigError(f"backbone.stages={stages!r} is not allowed: it must be a list of [channels, convs]")
        act = ACTIVATIONS[activation]

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, k, padding=k // 2, bias=not batch_norm),
                *([nn.BatchNorm2d(cout)] if batch_norm else []),
                act(cout) if act is nn.PReLU else act(),
            ]

        layers: list[nn.Module] = []
        cin = in_channels
        if conv0:
            layers += conv(cin, check_positive_int("backbone.conv0", conv0))
            cin = conv0
        for i, (cout, n) in enumerate(stages):
            check_positive_int(f"backbone.stages[{i}][0]", cout)
            for _ in range(check_positive_int(f"backbone.stages[{i}][1]", n)):
                layers += conv(cin, cout)
                cin = cout
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        self.features = nn.Sequential(*layers, nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        embed: list[nn.Module] = [nn.Linear(flat, self.embedding_dim)]
        if fc_bn_act:
            embed += [nn.BatchNorm1d(self.embedding_dim), act(self.embedding_dim) if act is nn.PReLU else act()]
        self.embed = nn.Sequential(*embed)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):  # "msra" fillers in the official prototxt
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.features(x))
