"""Face backbones (SphereFace nets, IResNet, MobileFaceNet): shapes at the papers' input sizes, layer and
parameter counts against the references; the large ones are built on the meta device (no memory, no compute)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from marginlab.backbones.iresnet import IResNet
from marginlab.backbones.mobilefacenet import MobileFaceNet
from marginlab.backbones.sphereface_net import SphereFaceNet
from marginlab.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "marginlab" / "configs" / "backbone"


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(
    "make,shape,dim",
    [
        (lambda: SphereFaceNet(depth=20), (2, 3, 112, 96), 512),
        (lambda: IResNet(depth=18), (2, 3, 112, 112), 512),
        (lambda: MobileFaceNet(), (2, 3, 112, 112), 128),
    ],
)
def test_forward_at_paper_size(make, shape, dim):
    """A real forward (CPU) for one net of each family; the other variants are checked on the meta device."""
    torch.manual_seed(0)
    net = make().eval()
    assert net.embedding_dim == dim
    with torch.inference_mode():
        out = net(torch.randn(*shape))
    assert out.shape == (shape[0], dim) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "make,shape,dim",
    [
        (lambda: SphereFaceNet(depth=4), (2, 3, 112, 96), 512),
        (lambda: SphereFaceNet(depth=10), (2, 3, 112, 96), 512),
        (lambda: SphereFaceNet(depth=20, embedding_dim=128), (2, 3, 112, 96), 128),
        (lambda: SphereFaceNet(depth=20, image_size=112), (2, 3, 112, 112), 512),
        (lambda: SphereFaceNet(units=[1, 0, 0, 1], in_channels=1), (2, 1, 112, 96), 512),
        (lambda: IResNet(depth=34, embedding_dim=64, in_channels=1, image_size=[112, 96]), (2, 1, 112, 96), 64),
        (lambda: MobileFaceNet(embedding_dim=512), (2, 3, 112, 112), 512),
        (lambda: MobileFaceNet(image_size=[112, 96]), (2, 3, 112, 96), 128),
    ],
)
def test_output_shape(make, shape, dim):
    with torch.device("meta"):
        net = make()
        out = net.train()(torch.empty(*shape))
    assert net.embedding_dim == dim and out.shape == (shape[0], dim)


def sphereface_params(units, h=112, w=96, dim=512) -> int:
    """Counted from the prototxt: per stage a biased 3x3 stride-2 conv + PReLU, 2 bias-free convs + 2 PReLUs
    per unit; FC from 512 x 7 x 6."""
    total, cin = 0, 3
    for width, n in zip((64, 128, 256, 512), units):
        total += cin * width * 9 + width + width + n * 2 * (width * width * 9 + width)
        cin = width
    for _ in range(4):
        h, w = (h + 1) // 2, (w + 1) // 2
    return total + 512 * h * w * dim + dim


@pytest.mark.parametrize(
    "depth,units", [(4, (0, 0, 0, 0)), (10, (0, 1, 2, 0)), (20, (1, 2, 4, 1)), (36, (2, 4, 8, 2)), (64, (3, 7, 16, 3))]
)
def test_sphereface_structure(depth, units):
    with torch.device("meta"):
        net = SphereFaceNet(depth=depth)
        out = net(torch.empty(1, 3, 112, 96))
    assert out.shape == (1, 512)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 + 2 * sum(units)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())  # no BN
    assert n_params(net) == sphereface_params(units)


@pytest.mark.parametrize("depth,millions", [(18, 24.03), (34, 34.14), (50, 43.59), (100, 65.16)])
def test_iresnet_parameter_counts(depth, millions):
    """InsightFace's r50 / r100 have 43.6M / 65.2M parameters at 512-d."""
    with torch.device("meta"):
        net = IResNet(depth=depth).eval()
        out = net(torch.empty(1, 3, 112, 112))
    assert out.shape == (1, 512)
    assert n_params(net) / 1e6 == pytest.approx(millions, abs=0.01)
    assert net.features.weight.requires_grad is False  # the output BN's scale is fixed at 1, as InsightFace


def test_mobilefacenet_size():
    net = MobileFaceNet()
    assert n_params(net) / 1e6 == pytest.approx(0.99, abs=0.02)  # the paper's 0.99M (128-d)


def test_configs_instantiate():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem.startswith(("sfnet", "iresnet", "mobilefacenet")))
    assert {"sfnet20", "sfnet64", "iresnet50", "mobilefacenet"} <= set(names)
    for name in names:
        cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
        size = [112, 96] if name.startswith("sfnet") else 112
        with torch.device("meta"):
            net = instantiate(cfg, in_channels=3, image_size=size)
            h, w = (size, size) if isinstance(size, int) else size
            assert net(torch.empty(2, 3, h, w)).shape == (2, cfg.embedding_dim), name


def test_bad_values():
    with pytest.raises(ConfigError, match="backbone.depth=21"):
        SphereFaceNet(depth=21)
    with pytest.raises(ConfigError, match="backbone.units"):
        SphereFaceNet(units=[1, 2, 3])
    with pytest.raises(ConfigError, match="backbone.depth=152"):
        IResNet(depth=152)
    with pytest.raises(ConfigError, match="backbone.image_size"):
        MobileFaceNet(image_size=[112])
    with pytest.raises(ConfigError, match="backbone.dropout"):
        IResNet(depth=18, dropout=1.5)
