"""The verification protocol against answers known by construction, by hand, and by independent code
(sklearn's KFold and roc_auc_score, and a loop-by-loop transcription of InsightFace's calculate_roc)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold
from torch import nn

from marginlab.errors import ConfigError
from marginlab.eval.verification import (
    ACC_THRESHOLDS,
    VAL_THRESHOLDS,
    auc_eer,
    embed_images,
    embed_pairs,
    evaluate,
    evaluate_distances,
    kfold,
)


# ---- independent references ------------------------------------------------------------------------------
def insightface_calculate_roc(thresholds, dist, actual_issame, nrof_folds):
    """InsightFace's calculate_roc / calculate_accuracy (pca=0), one threshold and one pair at a time."""

    def calculate_accuracy(threshold, d, same):
        tp = fp = tn = fn = 0
        for di, si in zip(d, same):
            predict = di < threshold
            tp += predict and si
            fp += predict and not si
            tn += (not predict) and (not si)
            fn += (not predict) and si
        tpr = 0 if tp + fn == 0 else tp / (tp + fn)
        fpr = 0 if fp + tn == 0 else fp / (fp + tn)
        return tpr, fpr, (tp + tn) / len(d)

    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    accuracy, best = np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(dist)))):
        acc_train = [calculate_accuracy(t, dist[train], actual_issame[train])[2] for t in thresholds]
        k = acc_train.index(max(acc_train))
        for j, t in enumerate(thresholds):
            tprs[f, j], fprs[f, j], _ = calculate_accuracy(t, dist[test], actual_issame[test])
        accuracy[f] = calculate_accuracy(thresholds[k], dist[test], actual_issame[test])[2]
        best[f] = thresholds[k]
    return tprs.mean(0), fprs.mean(0), accuracy, best


def reference_tar_at_far(dist, same, far_target, nfolds):
    """Per fold: walk the thresholds upwards, keep the last one whose training FAR is <= the target."""
    vals, fars = [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(dist))):
        chosen = VAL_THRESHOLDS[0]
        neg_train = dist[train][~same[train]]
        for t in VAL_THRESHOLDS:
            if np.mean(neg_train < t) <= far_target:
                chosen = t
        d, s = dist[test], same[test]
        vals.append(np.mean(d[s] < chosen))
        fars.append(np.mean(d[~s] < chosen))
    return np.mean(vals), np.std(vals), np.mean(fars)


# ---- folds -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(10, 10), (6000, 10), (7001, 10), (23, 4), (5, 2)])
def test_kfold_is_sklearn_kfold_without_shuffle(n, k):
    ours = kfold(n, k)
    theirs = list(KFold(n_splits=k, shuffle=False).split(np.arange(n)))
    assert len(ours) == len(theirs)
    for (a_train, a_test), (b_train, b_test) in zip(ours, theirs):
        assert a_train.tolist() == b_train.tolist() and a_test.tolist() == b_test.tolist()
    all_idx = np.arange(4)
    assert [(tr.tolist(), te.tolist()) for tr, te in kfold(4, 1)] == [(all_idx.tolist(), all_idx.tolist())]
    with pytest.raises(ConfigError, match="nfolds"):
        kfold(3, 4)


# ---- known answers -----------------------------------------------------------------------------------------
def test_perfectly_separable_pairs():
    rng = np.random.default_rng(0)
    dist = np.concatenate([rng.uniform(0.0, 1.0, 300), rng.uniform(2.0, 3.9, 300)])
    same = np.arange(600) < 300
    order = rng.permutation(600)
    r = evaluate_distances(dist[order], same[order], nfolds=10)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert r["auc"] == 1.0 and r["eer"] == 0.0
    assert r["tar_at_far"] == 1.0  # (a test-fold negative may still fall below a training-fold threshold)
    assert np.all((r["thresholds"] > 0.99) & (r["thresholds"] <= 2.0))
    assert r["tpr"].shape == r["fpr"].shape == ACC_THRESHOLDS.shape


def test_hand_computed_two_folds():
    # fold 0 = pairs 0, 1 (tested with the threshold learnt on pairs 2, 3); fold 1 the other way round.
    # Learnt on (0.305 same, 0.705 diff): the first best threshold is 0.31 -> fold 0: 0.105 < 0.31 same
    # (right), 0.505 >= 0.31 diff (right): 1.0. Learnt on (0.105 same, 0.505 diff): 0.11 -> fold 1:
    # 0.305 >= 0.11 diff (wrong), 0.705 diff (right): 0.5. Mean 0.75, population std 0.25.
    dist = np.array([0.105, 0.505, 0.305, 0.705])
    same = np.array([True, False, True, False])
    r = evaluate_distances(dist, same, nfolds=2)
    assert r["accuracies"].tolist() == [1.0, 0.5]
    assert r["accuracy"] == pytest.approx(0.75) and r["accuracy_std"] == pytest.approx(0.25)
    assert r["thresholds"] == pytest.approx([0.31, 0.11])
    # AUC: every same distance is below every diff distance -> 1.0, EER 0
    assert r["auc"] == 1.0 and r["eer"] == 0.0


@pytest.mark.parametrize(
    "pos,neg,auc,eer",
    [
        ([0.1, 0.4], [0.3, 0.5], 0.75, 0.5),  # ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1): crosses at the point (.5,.5)
        ([0.1, 0.4], [0.2], 0.5, 0.5),  # ROC (0,0) (0,.5) (1,.5) (1,1): FPR = FNR halfway along (0,.5)-(1,.5)
        ([0.5], [0.5], 0.5, 0.5),  # a tie: half credit
        ([0.1, 0.2, 0.5], [0.3, 0.6, 0.7], 8 / 9, 1 / 3),
    ],
)
def test_auc_and_eer_by_hand(pos, neg, auc, eer):
    dist = np.array(pos + neg)
    same = np.array([True] * len(pos) + [False] * len(neg))
    got_auc, got_eer = auc_eer(dist, same)
    assert got_auc == pytest.approx(auc) and got_eer == pytest.approx(eer)


def test_matches_insightface_transcription_and_sklearn_auc():
    rng = np.random.default_rng(1)
    n = 200
    same = rng.random(n) < 0.5
    dist = np.where(same, rng.normal(1.0, 0.4, n), rng.normal(1.6, 0.4, n)).clip(0, 4)
    dist = np.round(dist, 3)  # ties, and values on the threshold grid
    r = evaluate_distances(dist, same, nfolds=10)
    tpr, fpr, acc, best = insightface_calculate_roc(ACC_THRESHOLDS, dist, same, 10)
    np.testing.assert_array_equal(r["accuracies"], acc)
    np.testing.assert_array_equal(r["thresholds"], best)
    np.testing.assert_allclose(r["tpr"], tpr, atol=1e-12)
    np.testing.assert_allclose(r["fpr"], fpr, atol=1e-12)
    assert r["accuracy"] == pytest.approx(acc.mean()) and r["accuracy_std"] == pytest.approx(acc.std())
    assert r["auc"] == pytest.approx(roc_auc_score(same, -dist))
    assert 0 < r["eer"] < 0.5


@pytest.mark.parametrize("far_target", [1e-3, 0.05, 0.3])
def test_tar_at_far_matches_threshold_walk(far_target):
    rng = np.random.default_rng(2)
    n = 600
    same = np.arange(n) % 2 == 0
    dist = np.where(same, rng.normal(0.9, 0.3, n), rng.normal(1.5, 0.3, n)).clip(0, 4)
    r = evaluate_distances(dist, same, nfolds=10, far_target=far_target)
    tar, tar_std, far = reference_tar_at_far(dist, same, far_target, 10)
    assert r["tar_at_far"] == pytest.approx(tar) and r["tar_at_far_std"] == pytest.approx(tar_std)
    assert r["far"] == pytest.approx(far)


def test_tar_at_far_with_repeated_far_values():
    """Few negatives: the training FAR is a step function with long flat runs (interp1d's crash case)."""
    same = np.array([True] * 18 + [False] * 2)
    dist = np.concatenate([np.linspace(0.2, 1.0, 18), [0.5, 1.5]])
    order = np.random.default_rng(3).permutation(20)
    r = evaluate_distances(dist[order], same[order], nfolds=2, far_target=1e-3)
    tar, _, far = reference_tar_at_far(dist[order], same[order], 1e-3, 2)
    assert r["tar_at_far"] == pytest.approx(tar) and r["far"] == pytest.approx(far)


def test_evaluate_normalises_and_uses_squared_distance():
    rng = np.random.default_rng(4)
    e1, e2 = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    e2[:20] = e1[:20] + 0.1 * rng.normal(size=(20, 8))
    same = np.arange(40) < 20
    r = evaluate(3.0 * e1, 0.5 * e2, same, nfolds=4)
    u1 = e1 / np.linalg.norm(e1, axis=1, keepdims=True)
    u2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    ref = evaluate_distances(((u1 - u2) ** 2).sum(1), same, nfolds=4)
    assert r["accuracy"] == ref["accuracy"] and r["auc"] == ref["auc"] and r["eer"] == ref["eer"]
    np.testing.assert_array_equal(r["thresholds"], ref["thresholds"])


# ---- embeddings --------------------------------------------------------------------------------------------
class Toy(nn.Module):
    """A fixed asymmetric map with BN (so train/eval mode matters)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 4 * 6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.bn.running_mean.fill_(0.3)

    def forward(self, x):
        return self.bn(self.lin(x.flatten(1)))


def test_embed_pairs_flip_and_normalisation():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 4, 6), dtype=torch.uint8)
    net = Toy().train()
    e1, e2 = embed_pairs(net, images, batch_size=4, flip=True)
    assert net.training  # mode restored
    net.eval()
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        expected = F.normalize(net(x) + net(x.flip(-1)), dim=1).numpy()
    np.testing.assert_allclose(e1, expected[0::2], atol=1e-6)
    np.testing.assert_allclose(e2, expected[1::2], atol=1e-6)
    no_flip = embed_images(net, x, batch_size=5, flip=False).numpy()  # float input is used as given
    with torch.no_grad():
        np.testing.assert_allclose(no_flip, F.normalize(net(x), dim=1).numpy(), atol=1e-6)
    with pytest.raises(ConfigError, match="twos"):
        embed_pairs(net, images[:5], batch_size=4)
