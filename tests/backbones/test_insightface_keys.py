"""InsightFace arcface_torch IResNet weights load into marginlab's IResNet (through ``init_from``) and give the same
embeddings: their network is re-written here from ``recognition/arcface_torch/backbones/iresnet.py``."""

from __future__ import annotations

import torch
from torch import nn

from marginlab.backbones.insightface_keys import from_insightface, key_from_insightface
from marginlab.backbones.iresnet import IResNet
from marginlab.builders import MarginModel
from marginlab.weights import init_from


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
        self.layer1, self.layer2, self.layer3, self.layer4 = (self._make_layer(p, n) for p, n in
                                                              zip((64, 128, 256, 512), layers))
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0, inplace=True)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
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
