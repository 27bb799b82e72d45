"""InsightFace arcface_torch IResNet and MobileFaceNet weights load into marginlab's (through ``init_from`` and
``marginlab embed``) and give the same embeddings: their networks are re-written here from
``recognition/arcface_torch/backbones/iresnet.py`` and ``backbones/mobilefacenet.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from marginlab.backbones.insightface_keys import (
    from_insightface,
    key_from_insightface,
    mobilefacenet_blocks,
    mobilefacenet_units,
)
from marginlab.backbones.iresnet import IResNet
from marginlab.backbones.mobilefacenet import MobileFaceNet
from marginlab.commands.cli import main
from marginlab.errors import ConfigError
from marginlab.eval.verification import embed_images
from marginlab.training.builders import MarginModel
from marginlab.training.weights import backbone_node, init_from


class TheirBlock(nn.Module):
    """arcface_torch ``IBasicBlock`` (their attribute names are what the state dict keys are made of)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class TheirIResNet(nn.Module):
    """arcface_torch ``IResNet`` (fc_scale 7 * 7: a 112x112 input)."""

    def __init__(self, layers, num_features=512):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(p, n) for p, n in zip((64, 128, 256, 512), layers)
        )
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05)
        )
        layers = [TheirBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [TheirBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.prelu(self.bn1(self.conv1(x)))))))
        return self.features(self.fc(self.dropout(torch.flatten(self.bn2(x), 1))))


def their_trained_iresnet18() -> TheirIResNet:
    """Random weights and BatchNorm statistics (as after training), in eval mode."""
    torch.manual_seed(0)
    model = TheirIResNet((2, 2, 2, 2))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif name.endswith(("running_mean", "bias")):
                tensor.normal_(0, 0.1)
            elif name.endswith("weight") and tensor.dim() == 1:
                tensor.uniform_(0.5, 1.5)  # BatchNorm scales, PReLU slopes
            elif name.endswith("weight"):
                nn.init.kaiming_normal_(tensor)
    return model.eval()


def test_every_key_of_theirs_names_a_tensor_of_ours_with_the_same_shape():
    theirs, ours = TheirIResNet((3, 4, 6, 3)).state_dict(), IResNet(depth=34).state_dict()
    mapped = from_insightface(theirs)
    assert len(mapped) == len(theirs) and mapped.keys() == ours.keys()
    assert all(mapped[k].shape == ours[k].shape for k in ours)
    assert key_from_insightface("layer2.0.downsample.1.running_var") == "stages.1.0.downsample.1.running_var"
    assert key_from_insightface("conv1.weight") == "stem.0.weight" and key_from_insightface("head.w") is None


def test_their_state_dict_through_init_from_gives_their_embeddings(tmp_path):
    theirs = their_trained_iresnet18()
    path = tmp_path / "backbone.pth"  # arcface_torch saves backbone.module.state_dict() as backbone.pth
    torch.save(theirs.state_dict(), path)
    ours = MarginModel(IResNet(depth=18, image_size=112), nn.Linear(512, 3), nn.ModuleDict())
    message = init_from(ours, path)
    assert "loaded backbone" in message and "head.weight [3, 512] (not in the checkpoint)" in message
    x = torch.rand(4, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = theirs(x), ours.backbone.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


# ---------------------------------------------------------------- MobileFaceNet
# arcface_torch backbones/mobilefacenet.py (deepinsight/insightface, adapted there from cavaface.pytorch), class for
# class with their attribute names; only the forward's torch.cuda.amp.autocast(fp16=False), a no-op, is left out.
class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(num_features=out_c),
            nn.PReLU(num_parameters=out_c),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(num_features=out_c),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, out_c=groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
        )

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, groups=512, kernel=(7, 7), stride=(1, 1), padding=(0, 0)),
            Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.layers(x)


class TheirMobileFaceNet(nn.Module):
    """arcface_torch ``MobileFaceNet`` (``get_mbf``: blocks (1, 4, 6, 2), scale 2; ``get_mbf_large``: (2, 8, 12, 4),
    scale 4); its GDC is a fixed 7x7 kernel, so its input is 112x112."""

    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2):
        super().__init__()
        self.scale = scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, 64 * self.scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(
                ConvBlock(64 * self.scale, 64 * self.scale, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64)
            )
        else:
            self.layers.append(
                Residual(64 * self.scale, num_block=blocks[0], groups=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1))
            )
        self.layers.extend(
            [
                DepthWise(64 * self.scale, 64 * self.scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
                Residual(
                    64 * self.scale, num_block=blocks[1], groups=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1)
                ),
                DepthWise(64 * self.scale, 128 * self.scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
                Residual(
                    128 * self.scale, num_block=blocks[2], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)
                ),
                DepthWise(128 * self.scale, 128 * self.scale, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
                Residual(
                    128 * self.scale, num_block=blocks[3], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)
                ),
            ]
        )
        self.conv_sep = ConvBlock(128 * self.scale, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(num_features)

    def forward(self, x):
        for func in self.layers:
            x = func(x)
        return self.features(self.conv_sep(x))


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (as after training), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var") or (name.endswith("weight") and t.dim() == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)  # variances, BatchNorm scales, PReLU slopes
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2 / fan_in) ** 0.5)
    return model.eval()


def faces(root, face, n: int) -> torch.Tensor:
    """``n`` 112x112 face images, one per identity folder, as a uint8 [n, 3, 112, 112] batch."""
    images = []
    for i in range(n):
        (root / f"id{i}").mkdir(parents=True)
        images.append(face.image(i, (112, 112)))
        (root / f"id{i}" / "0.png").write_bytes(face.encode(images[-1]))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def test_every_key_of_their_mobilefacenets_names_a_tensor_of_ours_with_the_same_shape():
    for blocks, scale, config in [
        ((1, 4, 6, 2), 1, "mobilefacenet"),  # the paper's net
        ((1, 4, 6, 2), 2, "mbf"),
        ((2, 8, 12, 4), 4, "mbf_large"),
    ]:  # their get_mbf(_large)
        ours = instantiate(backbone_node(config), in_channels=3, image_size=112)
        theirs = TheirMobileFaceNet(ours.embedding_dim, blocks, scale).state_dict()
        assert mobilefacenet_blocks(theirs) == blocks
        mapped, ours = from_insightface(theirs), ours.state_dict()
        assert len(mapped) == len(theirs) and mapped.keys() == ours.keys(), (blocks, scale)
        assert all(mapped[k].shape == ours[k].shape for k in ours)
    units = mobilefacenet_units((1, 4, 6, 2))
    assert units["layers.3.layers.3.layers.2.layers"] == "features.6.body.2"  # the 4th block of the 1st Residual
    assert units["conv_sep.layers"] == "features.17" and units["features.layers.2"] == "embed"
    assert mobilefacenet_blocks(IResNet(depth=18).state_dict()) is None


def test_their_mbf_through_init_from_gives_their_embeddings(tmp_path):
    theirs = trained(TheirMobileFaceNet(512, (1, 4, 6, 2), scale=2))  # get_mbf(fp16=False, num_features=512)
    path = tmp_path / "backbone.pth"
    torch.save(theirs.state_dict(), path)
    ours = MarginModel(MobileFaceNet(512, width=2), nn.Linear(512, 3), nn.ModuleDict())
    assert "loaded backbone" in init_from(ours, path)
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = theirs(x), ours.backbone.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_marginlab_embed_of_their_bare_mobilefacenet_pth_gives_their_embeddings(tmp_path, face):
    x = faces(tmp_path / "faces", face, 2)
    for name, theirs in [
        ("mobilefacenet", trained(TheirMobileFaceNet(128, scale=1))),  # the paper's, 128-d
        ("mbf", trained(TheirMobileFaceNet(512, scale=2), seed=1)),
    ]:  # their model zoo's MFN
        path, out = tmp_path / f"{name}.pth", tmp_path / f"{name}.npy"
        torch.save(theirs.state_dict(), path)
        assert (
            main(
                [
                    "embed",
                    f"checkpoint={path}",
                    f"backbone={name}",
                    f"input={tmp_path / 'faces'}",
                    f"out={out}",
                    "flip=false",
                ]
            )
            == 0
        )
        want = embed_images(theirs, x, flip=False).numpy()  # their net, our preprocessing
        np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_export_format_insightface_of_a_mobilefacenet_loads_into_theirs(tmp_path):
    theirs = trained(TheirMobileFaceNet(512, scale=2))
    torch.save(theirs.state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "back.pth"
    assert (
        main(["export", f"checkpoint={tmp_path / 'backbone.pth'}", "backbone=mbf", "format=insightface", f"out={out}"])
        == 0
    )
    back = torch.load(out, weights_only=True)
    assert back.keys() == theirs.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())  # their keys, their tensors
    again = TheirMobileFaceNet(512, scale=2)
    again.load_state_dict(back)  # strict: what their get_mbf(...).load_state_dict takes


def test_mobilefacenet_width_and_blocks_are_checked():
    assert MobileFaceNet(width=2).features[1][0].weight.shape == (128, 2, 3, 3)  # 64 groups, as theirs
    with pytest.raises(ConfigError, match=r"backbone.blocks=\[1, 4, 6\] is not allowed: it must be 4 integers >= 1"):
        MobileFaceNet(blocks=[1, 4, 6])
    with pytest.raises(ConfigError, match="backbone.blocks"):
        MobileFaceNet(blocks=[1, 0, 6, 2])
    with pytest.raises(ConfigError, match="backbone.width=0 is not allowed"):
        MobileFaceNet(width=0)
