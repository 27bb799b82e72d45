"""The IJB 1:1 protocol functions against hand computations on small arrays (eval_ijbc.py's steps, written out
as loops here): template pooling under each flag, pair cosines, TAR@FAR with the script's tie rule, AUC."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from marginlab.eval.ijb import (
    evaluate_scores,
    image_features,
    pair_scores,
    tar_at_far,
    template_features,
)

# 7 images: template 10 = media 5 (2 frames) + media 6 (1 still); template 3 = media 5 (1 image: the same media id
# in another template is another media); template 7 = media 9 (3 frames)
TEMPLATES = np.array([10, 10, 10, 3, 7, 7, 7])
MEDIAS = np.array([5, 5, 6, 5, 9, 9, 9])
FACENESS = np.array([0.9, 0.5, 1.0, 0.7, 0.2, 0.8, 0.6], dtype=np.float32)


def features() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(7, 4)).astype(np.float32) * np.arange(1, 8)[:, None]


def by_hand(feats, norm_score, detector_score):
    """The script's loops: per image (optional unit norm, optional x faceness), mean per media, sum per template,
    unit norm; templates in sorted order."""
    out = {}
    for t in sorted(set(TEMPLATES.tolist())):
        total = np.zeros(feats.shape[1])
        for m in sorted(set(MEDIAS[TEMPLATES == t].tolist())):
            rows = []
            for i in np.flatnonzero((TEMPLATES == t) & (MEDIAS == m)):
                f = feats[i].astype(np.float64)
                if not norm_score:
                    f = f / np.linalg.norm(f)
                if detector_score:
                    f = f * float(FACENESS[i])
                rows.append(f)
            total += np.mean(rows, axis=0)
        out[t] = total / np.linalg.norm(total)
    return out


@pytest.mark.parametrize("norm_score", [True, False])
@pytest.mark.parametrize("detector_score", [True, False])
def test_template_features_pool_media_means_and_normalise(norm_score, detector_score):
    feats = features()
    got, ids = template_features(feats, TEMPLATES, MEDIAS, FACENESS, norm_score, detector_score, chunk_rows=3)
    want = by_hand(feats, norm_score, detector_score)
    assert ids.tolist() == [3, 7, 10]
    for row, t in enumerate(ids):
        np.testing.assert_allclose(got[row], want[t], rtol=1e-6, atol=1e-7)


def test_flags_change_the_templates():
    """Each flag matters (a pooling that ignored one would pass the test above only by chance)."""
    feats = features()
    variants = [
        template_features(feats, TEMPLATES, MEDIAS, FACENESS, n, d)[0] for n in (True, False) for d in (True, False)
    ]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(variants[i], variants[j])


def test_image_features_weights():
    feats = features()
    np.testing.assert_allclose(image_features(feats, FACENESS, True, True), feats * FACENESS[:, None], rtol=1e-6)
    unit = image_features(feats, FACENESS, False, False)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-12)


def test_pair_scores_are_template_cosines_and_unknown_templates_are_named():
    feats, ids = template_features(features(), TEMPLATES, MEDIAS, FACENESS)
    want = by_hand(features(), True, True)
    scores = pair_scores(feats, ids, np.array([10, 3, 7]), np.array([3, 7, 10]), block=2)
    np.testing.assert_allclose(scores, [want[10] @ want[3], want[3] @ want[7], want[7] @ want[10]], rtol=1e-6)
    with pytest.raises(KeyError, match="template 11 .pair 1"):
        pair_scores(feats, ids, np.array([10, 11]), np.array([3, 3]))


# genuine scores 0.9 0.8 0.7 0.4, impostor 0.85 0.3 0.2 0.1. sklearn's roc_curve (drop_intermediate) keeps
# (0, 0) (0, .25) (.25, .25) (.25, 1) (1, 1): FPR moves in steps of 0.25.
LABELS = np.array([1, 1, 1, 1, 0, 0, 0, 0])
SCORES = np.array([0.9, 0.8, 0.7, 0.4, 0.85, 0.3, 0.2, 0.1])


def test_tar_at_far_takes_the_nearest_fpr_and_its_largest_tpr():
    got = tar_at_far(LABELS, SCORES, [0.1, 0.125, 0.3, 0.9])
    # 0.1: nearest FPR 0 -> of (0, 0) and (0, .25) the larger TPR; 0.125: FPR 0 and .25 equally near -> the later
    # ROC point (eval_ijbc.py flips the arrays and takes the first minimum): (.25, 1); 0.3: FPR .25 -> TPR 1
    assert got == {0.1: 0.25, 0.125: 1.0, 0.3: 1.0, 0.9: 1.0}


def test_tar_at_far_matches_the_script_expression_on_random_scores():
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 3000)
    scores = np.round(rng.normal(size=3000) + labels, 1)  # rounded: many ties
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    targets = [1e-3, 1e-2, 1e-1, 0.5]
    for target, value in tar_at_far(labels, scores, targets).items():
        _, k = min(list(zip(abs(fpr - target), range(len(fpr)))))  # eval_ijbc.py, verbatim
        assert value == tpr[k]


def test_evaluate_scores_reports_every_far_auc_and_a_roc():
    out = evaluate_scores(LABELS, SCORES, far_targets=[0.1, 0.3], headline_far=0.3)
    assert out["tar_at_fars"] == {"1e-01": 0.25, "3e-01": 1.0}
    assert out["tar_at_far"] == 1.0 and out["far_target"] == 0.3
    assert out["auc"] == pytest.approx(roc_auc_score(LABELS, SCORES))
    assert out["eer"] == pytest.approx(0.25)
    assert out["fpr"][0] == 0 and out["fpr"][-1] == 1 and np.all(np.diff(out["tpr"]) >= 0)
    with pytest.raises(ValueError, match="genuine"):
        evaluate_scores(np.ones(4), np.arange(4.0))


def test_ijb_roc_figure_is_titled_by_the_headline_tar():
    from marginlab.figures.ijb_roc import ijb_roc_figure

    fig = ijb_roc_figure(evaluate_scores(LABELS, SCORES, far_targets=[0.1, 0.3], headline_far=0.3), "ijbc")
    ax = fig.axes[0]
    assert ax.get_title() == "ijbc: TAR@FAR=3e-01 1.0000, AUC 0.8125"
    assert ax.get_xscale() == "log" and ax.get_xlim() == pytest.approx((1e-6, 1e-1))
