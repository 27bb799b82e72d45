"""Geometry statistics against a hand-computed case: known features and weights with known angles and norms."""

from __future__ import annotations

import math

import pytest
import torch

from marginlab.geometry import batch_geometry, target_and_nearest_other
from marginlab.heads.amsoftmax import AMSoftmaxHead


def test_known_angles_and_norms():
    head = AMSoftmaxHead(2, 3, s=10.0, m=0.2)
    with torch.no_grad():  # class weights at 0, 90 and 180 degrees, norms 1, 2, 2
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-2.0, 0.0]]))
    deg = math.radians
    # sample 0: norm 2 at 30 deg, class 0 -> target 30 deg, nearest other (class 1) 60 deg
    # sample 1: norm 4 at 80 deg, class 1 -> target 10 deg, nearest other (class 0) 80 deg
    feats = torch.tensor([[2 * math.cos(deg(30)), 2 * math.sin(deg(30))], [4 * math.cos(deg(80)), 4 * math.sin(deg(80))]])
    labels = torch.tensor([0, 1])
    head(feats, labels)
    stats = batch_geometry(feats, head.last_cosine, labels, head)
    assert stats["feature_norm/mean"] == pytest.approx(3.0)
    assert stats["feature_norm/std"] == pytest.approx(1.0)
    assert stats["feature_norm/min"] == pytest.approx(2.0) and stats["feature_norm/max"] == pytest.approx(4.0)
    assert stats["angle/target_deg"] == pytest.approx(20.0, abs=1e-3)
    assert stats["angle/nearest_other_deg"] == pytest.approx(70.0, abs=1e-3)
    # margin 0.2 on cosines: cos30 - cos60 = 0.366 > 0.2 (ok); cos10 - cos80 = 0.811 > 0.2 (ok)
    assert stats["margin/violation_frac"] == 0.0
    assert stats["weight_norm/mean"] == pytest.approx(5 / 3)
    assert stats["weight_norm/std"] == pytest.approx(math.sqrt(((1 - 5 / 3) ** 2 + 2 * (2 - 5 / 3) ** 2) / 3))


def test_violation_counts_a_sample_inside_the_margin():
    head = AMSoftmaxHead(2, 2, s=10.0, m=0.5)
    cos = torch.tensor([[0.9, 0.5], [0.6, 0.3]])
    target, other = target_and_nearest_other(cos, torch.tensor([0, 0]))
    assert target.tolist() == pytest.approx([0.9, 0.6]) and other.tolist() == pytest.approx([0.5, 0.3])
    assert head.margin_violation(target, other).tolist() == [True, True]  # 0.4 and 0.3 are both < 0.5
