"""Geometry statistics against a hand-computed case: known features and weights with known angles and norms."""

from __future__ import annotations

import math

import pytest
import torch

from marginlab.geometry.stats import batch_geometry, target_and_nearest_other
from marginlab.heads.amsoftmax import AMSoftmaxHead


def test_known_angles_and_norms():
    head = AMSoftmaxHead(2, 3, s=10.0, m=0.2)
    with torch.no_grad():  # class weights at 0, 90 and 180 degrees, norms 1, 2, 2
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-2.0, 0.0]]))
    deg = math.radians
    # sample 0: norm 2 at 30 deg, class 0 -> target 30 deg, nearest other (class 1) 60 deg
    # sample 1: norm 4 at 80 deg, class 1 -> target 10 deg, nearest other (class 0) 80 deg
    feats = torch.tensor(
        [[2 * math.cos(deg(30)), 2 * math.sin(deg(30))], [4 * math.cos(deg(80)), 4 * math.sin(deg(80))]]
    )
    labels = torch.tensor([0, 1])
    stats = batch_geometry(feats, head.cosine(feats), labels, head)
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
    assert head.probe_margin.violation(target, other).tolist() == [True, True]  # 0.4 and 0.3 are both < 0.5


# ---- probe statistics: pairwise weight angles, intra-class spread, inter-class angles ------------------

from marginlab.geometry.stats import (  # noqa: E402
    class_angle_stats,
    class_weights,
    is_normalized,
    pairwise_angles,
    sample_angles,
    weight_angle_stats,
    weights_are_points,
)
from marginlab.heads.rbf import RBFHead  # noqa: E402
from marginlab.heads.softmax import SoftmaxHead  # noqa: E402
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead  # noqa: E402


def at_deg(angles_deg, norms=None):
    norms = [1.0] * len(angles_deg) if norms is None else norms
    return torch.tensor(
        [[r * math.cos(math.radians(a)), r * math.sin(math.radians(a))] for a, r in zip(angles_deg, norms)]
    )


def test_pairwise_weight_angles_of_known_weights():
    head = AMSoftmaxHead(2, 3)
    with torch.no_grad():  # 0, 90 and 180 degrees with norms 1, 2, 2: pairs at 90, 180 and 90 degrees
        head.weight.copy_(at_deg([0, 90, 180], [1, 2, 2]))
    stats = weight_angle_stats(head)
    assert stats["weight_angle/min_deg"] == pytest.approx(90.0, abs=1e-3)
    assert stats["weight_angle/mean_deg"] == pytest.approx(120.0, abs=1e-3)


def test_intra_and_inter_class_angles_of_a_known_sample():
    # class 0 at 10 and 30 deg (mean direction 20), class 1 alone at 110, class 2 at 190 and 230 (mean 210);
    # norms differ on purpose: the statistics are angular
    feats = at_deg([10, 30, 110, 190, 230], [1, 5, 2, 3, 0.5])
    labels = torch.tensor([0, 0, 1, 2, 2])
    stats = class_angle_stats(feats, labels)
    assert stats["class_angle/intra_deg"] == pytest.approx((10 + 10 + 0 + 20 + 20) / 5, abs=1e-3)
    # class means at 20, 110, 210: pairs at 90, 100 and 170 degrees
    assert stats["class_angle/inter_min_deg"] == pytest.approx(90.0, abs=1e-3)
    assert stats["class_angle/inter_mean_deg"] == pytest.approx(120.0, abs=1e-3)


def test_per_sample_target_and_nearest_other_angles():
    head = AMSoftmaxHead(2, 3)
    with torch.no_grad():
        head.weight.copy_(at_deg([0, 90, 180]))
    feats = at_deg([30, 80], [2, 4])
    target, other = sample_angles(head.cosine(feats), torch.tensor([0, 1]))
    assert target.tolist() == pytest.approx([30.0, 10.0], abs=1e-3)
    assert other.tolist() == pytest.approx([60.0, 80.0], abs=1e-3)


def test_pairwise_angles_subsample_large_class_counts():
    vectors = torch.randn(3000, 8, generator=torch.Generator().manual_seed(0))
    full = pairwise_angles(vectors, max_vectors=4096)
    sub = pairwise_angles(vectors, max_vectors=200)
    assert sub["min_deg"] >= full["min_deg"] - 1e-6  # a subset's minimum can only be larger
    assert sub["mean_deg"] == pytest.approx(full["mean_deg"], abs=1.0)
    assert pairwise_angles(vectors[:1]) == {}


def test_class_prototypes_and_head_kinds():
    head = SubCenterArcFaceHead(2, 3, k=2)
    with torch.no_grad():  # class 0: sub-centres at 0 and 90 deg -> prototype at 45 deg
        head.weight.copy_(at_deg([0, 90, 180, 180, 270, 270], [1, 3, 1, 1, 1, 1]))
    protos = class_weights(head)
    assert protos.shape == (3, 2)
    assert math.degrees(math.atan2(protos[0, 1], protos[0, 0])) == pytest.approx(45.0, abs=1e-4)
    assert is_normalized(AMSoftmaxHead(2, 3)) and not is_normalized(SoftmaxHead(2, 3))
    softmax = SoftmaxHead(2, 3)
    softmax.normalized_features = True  # a head can say so itself
    assert is_normalized(softmax)
    assert weights_are_points(RBFHead(2, 3)) and not weights_are_points(AMSoftmaxHead(2, 3))
