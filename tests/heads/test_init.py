"""``init``: each head's official initialisation of W (``official_init``, cited in its file) and nn.Linear's
kaiming (today's); checked by the statistics each official code gives, on a 2,000 x 256 weight."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from marginlab.config.validate import check_target_node
from marginlab.errors import ConfigError
from marginlab.heads.base import MarginHead

C, D = 2000, 256
#: config name -> the official initialisation, as its official code draws it
OFFICIAL = {
    "arcface": "normal_0.01",
    "combined": "normal_0.01",
    "subcenter_arcface": "normal_0.01",
    "curricularface": "normal_0.01",
    "adaface": "uniform_unit_rows",
    "magface": "uniform_unit_rows",
    "normface": "gaussian_unit_rows",
    "cosine": "gaussian_unit_rows",
    "coco": "gaussian_unit_rows",
    "sphereface": "caffe_xavier",
    "amsoftmax": "caffe_xavier",
    "cosface": "caffe_xavier",
    "lsoftmax": "caffe_msra",
    "rbf": "xavier_uniform",
    "sphereface2": "xavier_normal",
    "spherefacer": "xavier_normal",
    "softmax": "kaiming_uniform",
    "l2softmax": "kaiming_uniform",
    "x2softmax": "normal_0.01",
    "proxy_nca": "normal_1",
    "proxy_anchor": "kaiming_normal_fan_out",
    "softtriple": "kaiming_uniform_fan_out",
}


def check_statistics(w: torch.Tensor, kind: str, rows: int) -> None:
    norms = w.norm(dim=1)
    if kind == "normal_0.01":  # N(0, 0.01^2)
        assert w.std().item() == pytest.approx(0.01, rel=0.02) and abs(w.mean().item()) < 2e-4
    elif kind in ("uniform_unit_rows", "gaussian_unit_rows"):  # unit rows
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)
        if kind == "uniform_unit_rows":  # U(-1, 1) directions: |w| <= ||u|| ~ sqrt(D / 3) before the renorm
            u = w * math.sqrt(D / 3.0)
            assert u.abs().max() <= 1.2
        else:  # a Gaussian direction: entries ~ N(0, 1/D), kurtosis 3
            z = w * math.sqrt(D)
            assert (z**4).mean().item() == pytest.approx(3.0, rel=0.1)
    elif kind in ("caffe_xavier", "kaiming_uniform", "xavier_uniform"):  # uniform U(-a, a)
        a = {
            "caffe_xavier": math.sqrt(3.0 / D),
            "kaiming_uniform": 1.0 / math.sqrt(D),
            "xavier_uniform": math.sqrt(6.0 / (D + rows)),
        }[kind]
        assert w.abs().max().item() <= a and w.abs().max().item() > 0.99 * a
        assert w.std().item() == pytest.approx(a / math.sqrt(3.0), rel=0.02)
    elif kind == "xavier_normal":  # N(0, 2 / (D + C))
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / (D + rows)), rel=0.02) and abs(w.mean().item()) < 2e-4
    elif kind == "caffe_msra":  # N(0, 2/D)
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / D), rel=0.02)
    elif kind == "normal_1":  # N(0, 1)
        assert w.std().item() == pytest.approx(1.0, rel=0.02) and abs(w.mean().item()) < 0.02
    elif kind == "kaiming_normal_fan_out":  # kaiming_normal_(mode='fan_out') of rows x D: N(0, 2/rows)
        assert w.std().item() == pytest.approx(math.sqrt(2.0 / rows), rel=0.02)
    elif kind == "kaiming_uniform_fan_out":  # kaiming_uniform_(a=sqrt 5) of the D x rows kernel: U(+-1/sqrt(rows))
        a = 1.0 / math.sqrt(rows)
        assert a * 0.99 < w.abs().max().item() <= a
        assert w.std().item() == pytest.approx(a / math.sqrt(3.0), rel=0.02)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_init_has_the_documented_statistics(hh, name):
    head = hh.instantiate(name, in_features=D, num_classes=C)
    assert head.init == "official" and head.official_init == OFFICIAL[name]
    check_statistics(head.weight.detach(), OFFICIAL[name], head.weight.shape[0])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_kaiming_is_todays_init(hh, name):
    torch.manual_seed(3)
    head = hh.instantiate(name, in_features=16, num_classes=7, init="kaiming")
    torch.manual_seed(3)
    expected = nn.init.kaiming_uniform_(torch.empty(7, 16), a=math.sqrt(5))  # what every head drew before
    if head.weight.shape[0] != 7:  # sub-centres: the base's C x D draw, then the C k x D weight
        expected = nn.init.kaiming_uniform_(torch.empty(head.weight.shape), a=math.sqrt(5))
    torch.testing.assert_close(head.weight.detach(), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"init": "xavier"}, ["init='xavier'", "official, kaiming"]),
        ({"lr_mult": 0.0}, ["lr_mult=0.0", "(0, inf]"]),
        ({"weight_decay": -1e-4}, ["weight_decay=-0.0001", "[0, inf]"]),
    ],
)
def test_bad_common_keys_raise_config_error(hh, kwargs, words):
    with pytest.raises(ConfigError) as err:
        hh.instantiate("arcface", **kwargs)
    for word in words:
        assert word in str(err.value)


def test_the_common_keys_pass_config_validation():
    node = OmegaConf.create(
        {
            "_target_": "marginlab.heads.sphereface.SphereFaceHead",
            "init": "kaiming",
            "lr_mult": 100.0,
            "weight_decay": 0.0,
            "mode": "official",
        }
    )
    check_target_node("head", node)
    with pytest.raises(ConfigError, match="head.init=3 is not allowed: it must be a string"):
        check_target_node("head", OmegaConf.create({"_target_": "marginlab.heads.arcface.ArcFaceHead", "init": 3}))


def test_every_head_declares_a_known_official_init():
    from marginlab.heads.base import WEIGHT_INITS, fill_class_weight_

    assert MarginHead.official_init == "kaiming_uniform"
    with pytest.raises(ConfigError, match="one of"):
        fill_class_weight_(torch.empty(2, 2), "orthogonal")
    assert set(OFFICIAL.values()) <= set(WEIGHT_INITS)
