"""The margin check before training: the best spherical code and each margin's verdict."""

from __future__ import annotations

import logging
import math

import pytest

from marginlab.errors import ConfigError
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.combined import CombinedMarginHead
from marginlab.heads.normface import NormFaceHead
from marginlab.heads.sphereface import SphereFaceHead
from marginlab.training.margin_feasibility import (
    advise,
    best_code_angle,
    check_margin,
    gilbert_varshamov,
    packing_upper_bound,
)


@pytest.mark.parametrize("classes", [3, 5, 10, 12])
def test_two_dimensions_give_the_regular_polygon(classes):
    assert best_code_angle(classes, 2).deg == pytest.approx(360 / classes)


def test_simplex_when_the_dimension_allows_it():
    assert best_code_angle(4, 3).deg == pytest.approx(109.4712, abs=1e-3)  # tetrahedron
    assert best_code_angle(10, 64).deg == pytest.approx(math.degrees(math.acos(-1 / 9)))


def test_rankin_gives_90_degrees_up_to_2d_points():
    assert best_code_angle(6, 3).deg == 90.0  # octahedron
    assert best_code_angle(5, 3).deg == 90.0


@pytest.mark.parametrize("classes, known", [(12, 63.4349), (7, 77.8695), (8, 74.8585)])
def test_numerical_estimate_finds_the_known_optima_in_3d(classes, known):
    code = best_code_angle(classes, 3)  # icosahedron; Tammes problem values for 7, 8
    assert code.deg <= known + 1e-6 and code.deg == pytest.approx(known, abs=0.4)
    assert code.upper_deg >= known


def test_bounds_bracket_the_known_optima():
    for classes, dim, known in [(12, 3, 63.4349), (6, 3, 90.0), (24, 3, 43.691)]:
        assert gilbert_varshamov(classes, dim) <= known <= packing_upper_bound(classes, dim) + 1e-9


def test_arcface_with_the_readme_2d_example_is_tight_and_a_larger_margin_infeasible():
    advice = advise(ArcFaceHead(2, 10, s=64.0, m=0.5))
    assert advice.verdict == "tight"
    assert advice.cap_deg == pytest.approx((36 - math.degrees(0.5)) / 2, abs=0.02)  # (alpha - m) / 2
    assert advise(ArcFaceHead(2, 10, m=0.7)).verdict == "infeasible"  # m = 40.1 deg > 36 deg
    assert advise(ArcFaceHead(2, 10, s=10.0, m=0.2)).verdict == "ok"


def test_cosine_margin_compares_one_minus_m_with_the_code_cosine():
    # AM-Softmax's default m = 0.35 in 2-D: 1 - m = 0.65 < cos 36 deg = 0.81
    infeasible = advise(AMSoftmaxHead(2, 10, s=30.0, m=0.35))
    assert infeasible.verdict == "infeasible" and "loss can fall below" in infeasible.message
    assert advise(AMSoftmaxHead(64, 10, m=0.35)).verdict == "ok"  # simplex, 96.4 deg
    assert advise(CombinedMarginHead(2, 10)).verdict == "infeasible"  # cos(0.3) - 0.2 = 0.755 < 0.809


def test_multiplicative_margin_keeps_a_cap_of_alpha_over_m_plus_one():
    advice = advise(SphereFaceHead(2, 10, m=4))
    assert advice.verdict == "ok" and advice.cap_deg == pytest.approx(36 / 5, abs=0.02)


def test_heads_without_a_margin_are_not_checked():
    assert advise(NormFaceHead(2, 10)) is None


def test_strict_margin_refuses_and_otherwise_warns(caplog):
    head = ArcFaceHead(2, 10, m=0.7)
    with pytest.raises(ConfigError, match="trainer.strict_margin=true .* 10 classes in 2 dimensions"):
        check_margin(head, strict=True)
    with caplog.at_level(logging.WARNING, logger="marginlab.training.margin_feasibility"):
        assert check_margin(head, strict=False).verdict == "infeasible"
    assert "36.00 deg apart" in caplog.text


def test_strict_margin_stops_the_run_before_training(run_train, metrics):
    code, run_dir = run_train(
        "logger=quiet",
        "trainer.checkpoint=false",
        "backbone=lenet_pp",
        "head=arcface",
        "m=0.7",
        "trainer.strict_margin=true",
    )
    assert code == 2
    summary = metrics[0](run_dir)
    assert summary["status"] == "failed" and "strict_margin" in str(summary)
    assert not (run_dir / "metrics.jsonl").exists()  # not one epoch trained
