"""torchvision's ResNet-18/50 (He et al. 2016) for ImageNet-sized input, its fc layer producing the embedding."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from marginlab.checks import check_positive_int
from marginlab.errors import ConfigError

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")


class TorchvisionResNet(nn.Module):
    """``torchvision.models.<arch>(num_classes=embedding_dim)``, randomly initialised or, with ``pretrained``, its
    trunk from torchvision's ImageNet weights in torch hub's local cache (never downloaded)."""

    def __init__(
        self,
        arch: str = "resnet18",
        embedding_dim: int = 512,
        in_channels: int = 3,
        image_size: int = 224,
        pretrained: bool = False,
    ):
        super().__init__()
        if arch not in ARCHS:
            raise ConfigError(f"backbone.arch={arch!r} is not allowed: choose one of {', '.join(ARCHS)}")
        self.embedding_dim = check_positive_int("backbone.embedding_dim", embedding_dim)
        weights = imagenet_weights_file(arch) if pretrained else None
        if pretrained and in_channels != 3:
            raise ConfigError(f"backbone.pretrained=true needs 3 input channels (ImageNet's), not {in_channels}")
        # built as without weights whatever `pretrained` says: the fc (embedding) layer gets the same draws
        self.net = getattr(torchvision.models, arch)(weights=None, num_classes=self.embedding_dim)
        if in_channels != 3:
            self.net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        if weights is not None:
            self._load_imagenet_trunk(arch, weights)

    def _load_imagenet_trunk(self, arch: str, path: Path) -> None:
        """Every layer but ``fc`` from torchvision's ImageNet file ``path``, read without running any of it."""
        from marginlab.training.checkpoint import (
            read_checkpoint,  # the weights-only reader used for every untrusted file
        )

        state = read_checkpoint(path, required=())
        if not isinstance(state, dict):
            raise ConfigError(f"{path}: not a state dict of torchvision's {arch}")
        trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
        expected = {k for k in self.net.state_dict() if not k.startswith("fc.")}
        if set(trunk) != expected:
            missing, extra = sorted(expected - set(trunk)), sorted(set(trunk) - expected)
            raise ConfigError(
                f"{path}: not torchvision's {arch} weights ({len(missing)} keys missing, e.g. {missing[:1]}; "
                f"{len(extra)} unexpected, e.g. {extra[:1]})"
            )
        try:
            self.net.load_state_dict(trunk, strict=False)  # fc stays the fresh embedding layer drawn above
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines()]
            first = next((line for line in lines if line.startswith("size mismatch")), lines[-1])
            raise ConfigError(f"{path}: not torchvision's {arch} weights ({first})") from None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def imagenet_weights_file(arch: str) -> Path:
    """Where torch hub keeps torchvision's IMAGENET1K_V1 weights of ``arch`` (``torch.hub.get_dir()/checkpoints``,
    as ``load_state_dict_from_url`` names it); a ConfigError naming it and its URL when it is not there."""
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not path.is_file():  # no network here: name the file instead of letting torchvision download it
        raise ConfigError(
            f"backbone.pretrained=true: torchvision's ImageNet weights for {arch} are not at {path} "
            f"(nothing is downloaded): fetch {url} into that file on a machine with network, "
            f"or set backbone.pretrained=false"
        )
    return path
