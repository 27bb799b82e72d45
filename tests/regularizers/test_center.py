"""Center loss: hand-computed loss, update rule, gradient, buffer semantics, config group."""

import shutil
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir

from marginlab.errors import ConfigError
from marginlab.regularizers.base import Regularizer
from marginlab.regularizers.center import CenterLoss
from marginlab.regularizers.incay import FeatureIncay

CONFIGS = Path(__file__).resolve().parents[2] / "marginlab" / "configs" / "regularizer"


def tiny(alpha=0.5, weight=0.1):
    reg = CenterLoss(in_features=2, num_classes=3, weight=weight, alpha=alpha)
    with torch.no_grad():
        reg.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 2.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([0, 0, 1, 2])
    return reg, x, y


def test_loss_matches_hand_computation_before_the_update():
    reg, x, y = tiny()
    reg.train()
    loss = reg(x, y, None)
    # ||x - c||^2: (1,0)-(0,0) -> 1; (0,2)-(0,0) -> 4; (3,1)-(1,1) -> 4; (0,0)-(-1,2) -> 5; sum 14
    assert loss.item() == pytest.approx(0.1 * 14 / (2 * 4))


def test_update_rule_matches_hand_computed_centres():
    reg, x, y = tiny(alpha=0.5)
    reg.train()
    reg(x, y, None)
    # class 0: n=2, delta = ((0,0)-(1,0) + (0,0)-(0,2)) / 3 = (-1/3, -2/3); c <- c - 0.5 delta
    # class 1: n=1, delta = ((1,1)-(3,1)) / 2 = (-1, 0);   class 2: n=1, delta = ((-1,2)-(0,0)) / 2
    expected = torch.tensor([[1 / 6, 1 / 3], [1.5, 1.0], [-0.75, 1.5]])
    torch.testing.assert_close(reg.centers, expected)


def test_unseen_classes_and_eval_mode_leave_centres_alone():
    reg, x, y = tiny()
    before = reg.centers.clone()
    reg.eval()
    reg(x, y, None)
    torch.testing.assert_close(reg.centers, before)
    reg.train()
    reg(x[:2], y[:2], None)  # only class 0 present
    torch.testing.assert_close(reg.centers[1:], before[1:])


def test_gradient_is_lambda_times_offset_over_batch():
    reg, x, y = tiny(weight=0.3)
    centres = reg.centers.clone()
    x.requires_grad_(True)
    reg.train()
    reg(x, y, None).backward()
    torch.testing.assert_close(x.grad, 0.3 * (x.detach() - centres[y]) / 4)


def test_centres_are_a_buffer_the_optimizer_never_touches():
    torch.manual_seed(0)
    reg = CenterLoss(in_features=4, num_classes=3, weight=1.0, alpha=0.0)
    assert list(reg.parameters()) == [] and "centers" in dict(reg.named_buffers())
    net = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(list(net.parameters()) + list(reg.parameters()), lr=10.0, weight_decay=0.1)
    before = reg.centers.clone()
    reg.train()
    reg(net(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1]), None).backward()
    opt.step()
    torch.testing.assert_close(reg.centers, before)  # alpha = 0: nothing else may move them


def test_state_dict_round_trip_and_bf16():
    reg, x, y = tiny()
    reg.train()
    reg(x, y, None)
    other = CenterLoss(in_features=2, num_classes=3)
    other.load_state_dict(reg.state_dict())
    torch.testing.assert_close(other.centers, reg.centers)
    x = torch.zeros(4, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = other(x.to(torch.bfloat16), y, None)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kwargs, name, allowed",
    [
        ({"alpha": 1.5}, "alpha", "[0, 1]"),
        ({"weight": -0.1}, "weight", "[0, inf]"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        CenterLoss(in_features=2, num_classes=3, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)


def test_wrong_embedding_width_is_a_config_error():
    reg = CenterLoss(in_features=3, num_classes=2)
    with pytest.raises(ConfigError, match="in_features"):
        reg(torch.zeros(2, 4), torch.tensor([0, 1]), None)


def test_config_group_lands_under_regularizer_name(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "regularizer")
    (tmp_path / "main.yaml").write_text("defaults:\n  - regularizer: null\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose("main", overrides=["regularizer=[center,incay]"])
    assert set(cfg.regularizer) == {"center", "incay"}
    regs = {name: hydra.utils.instantiate(node, in_features=4, num_classes=3) for name, node in cfg.regularizer.items()}
    assert isinstance(regs["center"], CenterLoss) and isinstance(regs["incay"], FeatureIncay)
    assert all(isinstance(r, Regularizer) for r in regs.values())
    assert regs["center"].weight == 0.003 and regs["center"].alpha == 0.5
