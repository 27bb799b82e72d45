"""The verification protocol on scikit-learn (KFold, roc_curve, auc) gives what the hand-written code gave, to the
bit, on 6,000 pairs; the ROC figure comes from the exact ROC; a grid too coarse for the distances is a warning."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest

from marginlab.eval.verification import auc_eer, evaluate_distances, exact_roc, kfold
from marginlab.figures.roc import verification_roc_figure
from marginlab.files import write_json


# ---- the old, hand-written computation (float64), kept as the reference ---------------------------------------
def old_kfold(n: int, nfolds: int):
    idx = np.arange(n)
    if nfolds == 1:
        return [(idx, idx)]
    sizes = np.full(nfolds, n // nfolds)
    sizes[: n % nfolds] += 1
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    return [(np.concatenate((idx[:lo], idx[hi:])), idx[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def old_exact_roc(dist, issame):
    order = np.argsort(dist, kind="mergesort")
    d, same = dist[order], issame[order]
    tp, fp = np.cumsum(same), np.cumsum(~same)
    last = np.concatenate((np.flatnonzero(np.diff(d)), [len(d) - 1]))
    n_pos, n_neg = max(int(same.sum()), 1), max(int((~same).sum()), 1)
    return (
        np.concatenate(([0.0], fp[last] / n_neg)),
        np.concatenate(([0.0], tp[last] / n_pos)),
        np.concatenate(([-np.inf], d[last])),
    )


def old_auc_eer(dist, issame):
    fpr, tpr, _ = old_exact_roc(dist, issame)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    gap = fpr - (1 - tpr)
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0 or k == 0:
        return auc, float(fpr[k])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    return auc, float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def pairs(n: int, seed: int, decimals: int | None = 3):
    rng = np.random.default_rng(seed)
    same = rng.random(n) < 0.5
    dist = np.where(same, rng.normal(1.0, 0.4, n), rng.normal(1.6, 0.4, n)).clip(0, 4)
    return (np.round(dist, decimals) if decimals is not None else dist), same


@pytest.mark.parametrize("decimals", [3, None])  # with ties (and values on the grid), and without
def test_sklearn_gives_the_old_computation_on_6000_pairs(decimals):
    dist, same = pairs(6000, seed=7, decimals=decimals)
    for got, want in zip(kfold(6000, 10), old_kfold(6000, 10)):
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    for got, want in zip(exact_roc(dist, same), old_exact_roc(dist, same)):
        assert got.dtype == np.float64 and np.array_equal(got, want)
    assert auc_eer(dist, same) == old_auc_eer(dist, same)  # bit for bit


def test_distances_below_the_grid_step_warn_and_the_exact_roc_is_perfect(caplog):
    """The issue's case: every distance below 0.01, perfectly separated: the grid gives acc 0.5 beside AUC 1."""
    rng = np.random.default_rng(0)
    same = np.arange(600) % 2 == 0
    dist = np.where(same, rng.uniform(0.0, 0.004, 600), rng.uniform(0.005, 0.009, 600))
    with caplog.at_level(logging.WARNING, logger="marginlab.eval.verification"):
        r = evaluate_distances(dist, same)
    assert r["accuracy"] == 0.5 and r["auc"] == 1.0 and r["eer"] == 0.0
    (warning,) = r["warnings"]
    assert "resolution of the accuracy protocol's threshold grid (step 0.01)" in warning
    assert "best accuracy over all pairs is 0.5000, an exact threshold reaches 1.0000" in warning
    assert warning in caplog.text
    assert r["exact_tpr"][r["exact_fpr"] == 0].max() == 1.0  # TAR 1 at FAR 0
    fig = verification_roc_figure(r, "lfw")
    ax = fig.axes[0]
    x, y = ax.lines[0].get_data()
    lo, hi = ax.get_xlim()
    assert np.all((x >= lo) & (x <= hi))  # every point on the axes (FAR 0 at their left end)
    assert y[x == lo].max() == 1.0 and y[x == hi].min() == 1.0  # TAR 1 across the FAR axis, not an empty plot
    assert any("threshold grid" in t.get_text() for t in ax.texts)


def test_ordinary_distances_do_not_warn_and_the_figure_draws_the_exact_roc():
    dist, same = pairs(600, seed=1, decimals=None)
    r = evaluate_distances(dist, same)
    assert r["warnings"] == [] and "undefined" not in r
    fpr, tpr, _ = exact_roc(dist, same, drop_intermediate=True)
    np.testing.assert_array_equal(r["exact_fpr"], fpr)
    assert len(fpr) > 10 and len(fpr) != len(r["fpr"])  # not the 400-point grid
    _, y = verification_roc_figure(r, "lfw").axes[0].lines[0].get_data()
    np.testing.assert_array_equal(y, tpr)


def test_one_kind_of_pairs_gives_null_and_a_reason_in_json(tmp_path):
    r = evaluate_distances(np.linspace(0.1, 1.0, 20), np.ones(20, dtype=bool), nfolds=2)
    assert np.isnan(r["auc"]) and "every one of the 20 pairs is a same-identity pair" in r["undefined"]["auc"]
    assert np.isnan(r["tar_at_far"]) and np.isnan(r["far"])  # TAR@FAR read 1.0 with no impostor pair
    assert r["undefined"]["tar_at_far"] == r["undefined"]["auc"]
    impostors = evaluate_distances(np.linspace(0.1, 1.0, 20), np.zeros(20, dtype=bool), nfolds=2)
    assert np.isnan(impostors["tar_at_far"]) and "different-identity" in impostors["undefined"]["tar_at_far"]
    path = tmp_path / "r.json"
    write_json(path, {"results": {"lfw": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()}}})
    text = path.read_text()
    assert "NaN" not in text
    saved = json.loads(text)["results"]["lfw"]
    assert saved["auc"] is None and saved["undefined"]["auc"].startswith("undefined: every one")
