"""Feature incay: h masking, smooth variant, gradient, zero norms, config errors."""

import pytest
import torch

from marginlab.errors import ConfigError
from marginlab.regularizers.incay import FeatureIncay


def batch():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])  # squared norms 25, 1, 4
    y = torch.tensor([0, 1, 2])
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0],  # correct
            [2.0, 1.0, 0.0],  # wrong: argmax 0, label 1
            [0.0, 0.0, 3.0],
        ]
    )  # correct
    return x, y, logits


def test_only_correctly_classified_samples_count():
    x, y, logits = batch()
    reg = FeatureIncay(in_features=2, num_classes=3, weight=0.5, eps=1e-6)
    loss = reg(x, y, logits)
    expected = 0.5 * (1 / (25 + 1e-6) + 0.0 + 1 / (4 + 1e-6)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_gradient_matches_closed_form_and_skips_wrong_samples():
    x, y, logits = batch()
    x.requires_grad_(True)
    logits.requires_grad_(True)
    reg = FeatureIncay(in_features=2, num_classes=3, weight=0.5, eps=1e-6)
    reg(x, y, logits).backward()
    h = torch.tensor([1.0, 0.0, 1.0]).view(-1, 1)
    sq = x.detach().pow(2).sum(1, keepdim=True)
    torch.testing.assert_close(x.grad, -2 * 0.5 * h * x.detach() / (3 * (sq + 1e-6) ** 2))
    assert logits.grad is None  # h only weighs the term


def test_smooth_variant_uses_true_class_probability():
    x, y, logits = batch()
    logits.requires_grad_(True)
    reg = FeatureIncay(in_features=2, num_classes=3, weight=1.0, eps=1e-6, smooth=True)
    p = torch.softmax(logits.detach(), dim=1)[torch.arange(3), y]
    expected = (p / (x.pow(2).sum(1) + 1e-6)).mean()
    loss = reg(x, y, logits)
    torch.testing.assert_close(loss, expected)
    assert not loss.requires_grad  # no path back into the logits


def test_zero_norm_features_stay_finite_under_bf16():
    x, y, logits = batch()
    x = x.clone()
    x[0] = 0.0
    x.requires_grad_(True)
    reg = FeatureIncay(in_features=2, num_classes=3, weight=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = reg(x.to(torch.bfloat16), y, logits.to(torch.bfloat16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "kwargs, name, allowed",
    [
        ({"eps": 0.0}, "eps", "(0, inf]"),
        ({"weight": -1.0}, "weight", "[0, inf]"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs, name, allowed):
    with pytest.raises(ConfigError) as err:
        FeatureIncay(in_features=2, num_classes=3, **kwargs)
    assert f"{name}=" in str(err.value) and allowed in str(err.value)
