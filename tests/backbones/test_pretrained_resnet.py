"""backbone.pretrained=true: torchvision's ImageNet trunk read from torch hub's local cache only, fc a fresh
embedding layer; a missing file is one line naming it; pretrained=false draws exactly as before."""

from __future__ import annotations

import pytest
import torch
import torchvision

from marginlab.backbones.torchvision_resnet import TorchvisionResNet, imagenet_weights_file
from marginlab.errors import ConfigError

#: torch hub's file name of torchvision's resnet18 IMAGENET1K_V1 weights (the tail of its download URL)
RESNET18_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache; torch.hub.load_state_dict_from_url fails the test if anything tries a download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError("torchvision tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch"


def fake_imagenet_weights(torch_home) -> dict:
    """A torchvision resnet18 state dict with ImageNet's 1000-way fc, saved where torch hub caches the real one."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()
    path = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_the_trunk_comes_from_the_cached_file_and_fc_is_the_embedding(torch_home):
    state = fake_imagenet_weights(torch_home)
    assert imagenet_weights_file("resnet18") == torch_home / "hub" / "checkpoints" / RESNET18_FILE
    torch.manual_seed(0)
    net = TorchvisionResNet("resnet18", embedding_dim=16, pretrained=True)
    loaded = net.net.state_dict()
    trunk = [k for k in state if not k.startswith("fc.")]
    assert trunk and all(torch.equal(loaded[k], state[k]) for k in trunk)
    assert net.net.fc.weight.shape == (16, 512) and net.net.fc.bias.shape == (16,)
    torch.manual_seed(0)
    scratch = TorchvisionResNet("resnet18", embedding_dim=16)
    assert torch.equal(net.net.fc.weight, scratch.net.fc.weight)  # fc drawn as without weights
    assert torch.equal(net.net.fc.bias, scratch.net.fc.bias)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_pretrained_false_draws_exactly_as_before(torch_home):
    fake_imagenet_weights(torch_home)  # present, and still unused
    torch.manual_seed(7)
    before = torchvision.models.resnet18(weights=None, num_classes=32).state_dict()  # the code path before the option
    for kwargs in ({}, {"pretrained": False}):
        torch.manual_seed(7)
        now = TorchvisionResNet("resnet18", embedding_dim=32, **kwargs).net.state_dict()
        assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


def test_a_file_of_another_network_is_refused_in_one_line(torch_home):
    state = fake_imagenet_weights(torch_home)
    path = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    torch.save(state | {"conv1.weight": torch.zeros(64, 3, 3, 3)}, path)  # a 3x3 stem, not ResNet's 7x7
    with pytest.raises(ConfigError, match=f"{path}: not torchvision's resnet18 weights \\(size mismatch") as err:
        TorchvisionResNet("resnet18", embedding_dim=8, pretrained=True)
    assert "\n" not in str(err.value)


def test_pretrained_needs_three_channels(torch_home):
    fake_imagenet_weights(torch_home)
    with pytest.raises(ConfigError, match="needs 3 input channels"):
        TorchvisionResNet("resnet18", embedding_dim=8, in_channels=1, pretrained=True)


def test_a_missing_weights_file_is_one_line_through_the_cli(torch_home, run_train, capfd):
    code, _ = run_train("backbone=resnet18", "backbone.pretrained=true", "trainer.epochs=1", "logger.tensorboard=false")
    err = capfd.readouterr().err.strip().splitlines()
    path = torch_home / "hub" / "checkpoints" / RESNET18_FILE
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("marginlab: error: backbone.pretrained=true: ")
    assert f"not at {path}" in err[0] and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err[0]
    assert "backbone.pretrained=false" in err[0]
