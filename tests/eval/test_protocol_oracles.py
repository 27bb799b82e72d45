"""Our reported numbers against InsightFace's scripts, their steps written out here as the oracle, on seeded
synthetic data, to the digit we print: ``eval/verification.py`` (``test``, ``calculate_roc``, ``calculate_val``),
``eval_ijbc.py`` (1:1 template pooling, TAR at each FAR) and ``_evaluation_/ijb/ijb_evals.py`` (1:N). Also the
cases the scripts crash on (NaN features) and the degenerate one where ours and theirs part deliberately."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline
from sklearn.metrics import auc, roc_curve
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize
from torch import nn

from marginlab.errors import DataError
from marginlab.eval.ijb import evaluate_scores, pair_scores, template_features
from marginlab.eval.ijb_identification import evaluate_identification
from marginlab.eval.verification import embed_pairs, evaluate, evaluate_distances


# ---- eval/verification.py, step by step --------------------------------------------------------------------------
def if_calculate_accuracy(threshold, dist, actual_issame):
    predict_issame = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict_issame, actual_issame))
    fp = np.sum(np.logical_and(predict_issame, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict_issame), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict_issame), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def if_fold_accuracies(dist, issame, nfolds=10):
    """calculate_roc (pca=0): the first best threshold of arange(0, 4, 0.01) on the other folds."""
    thresholds = np.arange(0, 4, 0.01)
    accuracy = np.zeros(nfolds)
    for fold, (train, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(dist)))):
        acc_train = [if_calculate_accuracy(t, dist[train], issame[train])[2] for t in thresholds]
        accuracy[fold] = if_calculate_accuracy(thresholds[int(np.argmax(acc_train))], dist[test], issame[test])[2]
    return accuracy


def scipy18_slinear(x, y):
    """scipy 1.8's interp1d(x, y, kind='slinear'): make_interp_spline(k=1) = BSpline(r_[x0, x, xn], y, 1), which
    accepted repeated x (scipy 1.10 on raises "Expect x to not have duplicates", insightface issue #2152)."""
    return BSpline.construct_fast(np.r_[x[0], x, x[-1]], np.asarray(y, dtype=np.float64), 1)


def if_calculate_val(dist, issame, far_target=1e-3, nfolds=10):
    """calculate_val: threshold = interp1d(far_train, thresholds, 'slinear')(far_target), else 0; (val, std, far).
    (far_train over the 4000 thresholds computed at once: the same counts as calculate_val_far's loop.)"""
    thresholds = np.arange(0, 4, 0.001)
    val, far = np.zeros(nfolds), np.zeros(nfolds)
    for fold, (train, test) in enumerate(KFold(n_splits=nfolds, shuffle=False).split(np.arange(len(dist)))):
        neg = dist[train][~issame[train]]
        far_train = np.less(neg[None, :], thresholds[:, None]).sum(1) / float(len(neg))
        threshold = float(scipy18_slinear(far_train, thresholds)(far_target)) if far_train.max() >= far_target else 0.0
        accept = np.less(dist[test], threshold)
        val[fold] = float(np.sum(accept & issame[test])) / float(np.sum(issame[test]))
        far[fold] = float(np.sum(accept & ~issame[test])) / float(np.sum(~issame[test]))
    return val.mean(), val.std(), far.mean()


def lfw_like(seed, sigma, n=6000, dim=64):
    """LFW's layout (10 folds of 300 same then 300 different pairs), unit embeddings around unit centres."""
    rng = np.random.default_rng(seed)
    same = np.tile(np.repeat([True, False], 300), n // 600)
    c1, c2 = normalize(rng.normal(size=(n, dim))), normalize(rng.normal(size=(n, dim)))
    c2[same] = c1[same]
    e1 = normalize(c1 + rng.normal(0, sigma / np.sqrt(dim), (n, dim)))
    e2 = normalize(c2 + rng.normal(0, sigma / np.sqrt(dim), (n, dim)))
    return e1, e2, same


@pytest.mark.parametrize(
    "seed,sigma,tar_ours,tar_theirs",
    [(0, 0.9, "0.9850", "0.9853"), (1, 1.1, "0.7613", "0.7623"), (2, 1.1, "0.7623", "0.7643")],
)
def test_lfw_like_accuracy_matches_and_tar_is_at_most_insightfaces(seed, sigma, tar_ours, tar_theirs):
    e1, e2, same = lfw_like(seed, sigma)
    r = evaluate(e1, e2, same)
    dist = np.sum(np.square(e1 - e2), 1)  # evaluate(): embeddings already unit (sklearn normalize)
    acc = if_fold_accuracies(dist, same)
    np.testing.assert_array_equal(r["accuracies"], acc)  # every fold, to the bit
    assert (r["accuracy"], r["accuracy_std"]) == (np.mean(acc), np.std(acc))
    # the documented difference (calculate_val's docstring): our threshold is the grid point at or below theirs
    val, _, far = if_calculate_val(dist, same)
    assert (f"{r['tar_at_far']:.4f}", f"{val:.4f}") == (tar_ours, tar_theirs)
    assert r["tar_at_far"] <= val and r["far"] <= far


class Linear(nn.Module):
    """A fixed map that is not mirror-symmetric, with outputs far from unit norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 16)

    def forward(self, x):
        return 20 * self.fc(x.flatten(1))


def test_flip_embedding_pipeline_matches_insightface_test():
    """verification.test(): backbone(x) and backbone(mirror x) as float64, summed, sklearn normalize, evaluate."""
    rng = np.random.default_rng(5)
    pairs, ids = 400, 60
    protos = rng.integers(0, 256, (ids, 3, 8, 8))
    a, b = rng.integers(0, ids, pairs), rng.integers(0, ids, pairs)
    same = np.arange(pairs) % 2 == 0
    b[same] = a[same]
    same = a == b
    noisy = lambda p: np.clip(protos[p] + rng.normal(0, 60, (pairs, 3, 8, 8)), 0, 255)  # noqa: E731
    images = torch.from_numpy(np.stack([noisy(a), noisy(b)], 1).reshape(2 * pairs, 3, 8, 8).astype(np.uint8))
    net = Linear().eval()
    with torch.no_grad():
        x = ((images / 255) - 0.5) / 0.5  # test(): img = ((_data / 255) - 0.5) / 0.5
        emb = normalize(net(x).numpy().astype(np.float64) + net(x.flip(-1)).numpy().astype(np.float64))
    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    acc = if_fold_accuracies(dist, same)
    val, _, _ = if_calculate_val(dist, same, far_target=0.05)

    r = evaluate(*embed_pairs(net, images, batch_size=64), same, far_target=0.05)
    np.testing.assert_array_equal(r["accuracies"], acc)
    assert 0.6 < r["accuracy"] < 0.95  # neither trivial nor hopeless
    assert f"{r['accuracy']:.4f} +- {r['accuracy_std']:.4f}" == f"{np.mean(acc):.4f} +- {np.std(acc):.4f}"
    assert r["tar_at_far"] <= val


def test_collapsed_embeddings_all_one_distance():
    """Every embedding the same (a collapsed model): accuracy 0.5 (threshold 0, the first best), AUC and EER 0.5.
    TAR@FAR: ours 0 at FAR 0; InsightFace's interpolation lands between thresholds 0 and 0.001 and accepts every
    pair: TAR 1 at the FAR 1 it reached. (Both differences are the documented ones of calculate_val.)"""
    same = np.arange(600) % 2 == 0
    e = np.ones((600, 8))
    r = evaluate(e, e, same)
    dist = np.zeros(600)
    assert r["accuracy"] == np.mean(if_fold_accuracies(dist, same)) == 0.5 and r["accuracy_std"] == 0.0
    assert r["thresholds"].tolist() == [0.0] * 10
    assert (r["auc"], r["eer"]) == (0.5, 0.5)
    assert (r["tar_at_far"], r["far"]) == (0.0, 0.0)
    assert if_calculate_val(dist, same)[::2] == (1.0, 1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_embeddings_are_one_line_naming_the_pair(bad):
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    e2[7, 3] = bad
    with pytest.raises(DataError, match=r"1 of the 40 pair distances are not finite .NaN or inf., the first at pair 7"):
        evaluate(e1, e2, np.arange(40) % 2 == 0, nfolds=4)
    with pytest.raises(DataError, match="first at pair 2"):
        evaluate_distances([0.1, 0.2, np.nan, 0.4], [True, False, True, False], nfolds=2)


# ---- eval_ijbc.py, step by step ------------------------------------------------------------------------------------
def ijbc_image2template_feature(img_feats, templates, medias):
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count_template, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_norm_feats = img_feats[ind_t]
        face_medias = medias[ind_t]
        unique_medias, unique_media_counts = np.unique(face_medias, return_counts=True)
        media_norm_feats = []
        for u, ct in zip(unique_medias, unique_media_counts):
            (ind_m,) = np.where(face_medias == u)
            if ct == 1:
                media_norm_feats += [face_norm_feats[ind_m]]
            else:
                media_norm_feats += [np.mean(face_norm_feats[ind_m], axis=0, keepdims=True)]
        template_feats[count_template] = np.sum(np.array(media_norm_feats), axis=0)
    return normalize(template_feats), unique_templates


def ijbc_table(img_feats, faceness, templates, medias, p1, p2, label, use_norm_score, use_detector_score):
    """eval_ijbc.py from its float32 (N x 2D: image, mirror) features to the TAR row ('%.2f' of percent) and AUC."""
    img_input_feats = img_feats[:, 0 : img_feats.shape[1] // 2] + img_feats[:, img_feats.shape[1] // 2 :]
    if not use_norm_score:
        img_input_feats = img_input_feats / np.sqrt(np.sum(img_input_feats**2, -1, keepdims=True))
    if use_detector_score:
        img_input_feats = img_input_feats * faceness[:, np.newaxis]
    feats, unique_templates = ijbc_image2template_feature(img_input_feats, templates, medias)
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count_template, uqt in enumerate(unique_templates):
        template2id[uqt] = count_template
    score = np.sum(feats[template2id[p1]] * feats[template2id[p2]], -1).flatten()
    fpr, tpr, _ = roc_curve(label, score)
    roc_auc = auc(fpr, tpr)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    row = []
    for x in [10**-6, 10**-5, 10**-4, 10**-3, 10**-2, 10**-1]:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        row.append("%.2f" % (tpr[min_index] * 100))
    return row, "%0.4f" % (roc_auc * 100)


def ijb_like(seed, subjects=30, templates=90, dim=16):
    """Templates of subjects, each 1-3 medias of 1-4 frames (float32 image and mirror features, norms 5-40, faceness
    0.1-1), every template pair scored."""
    rng = np.random.default_rng(seed)
    centre = normalize(rng.normal(size=(subjects, dim)))
    subject = rng.integers(0, subjects, templates)
    rows_t, rows_m, feats = [], [], []
    for t in range(templates):
        for m in rng.choice(1000, rng.integers(1, 4), replace=False):
            for _ in range(rng.integers(1, 5)):
                f = centre[subject[t]] + rng.normal(0, 0.5, dim)
                rows_t.append(t + 100)
                rows_m.append(m)
                feats.append(np.r_[f, f + rng.normal(0, 0.1, dim)] * rng.uniform(5, 40))
    p1, p2 = np.triu_indices(templates, 1)
    label = (subject[p1] == subject[p2]).astype(int)
    faceness = rng.uniform(0.1, 1.0, len(rows_t)).astype(np.float32)
    return np.array(feats, np.float32), faceness, np.array(rows_t), np.array(rows_m), p1 + 100, p2 + 100, label


@pytest.mark.parametrize("norm_score", [True, False])
@pytest.mark.parametrize("detector_score", [True, False])
def test_ijb_11_table_matches_eval_ijbc(norm_score, detector_score):
    img_feats, faceness, templates, medias, p1, p2, label = ijb_like(3)
    row, auc_text = ijbc_table(img_feats, faceness, templates, medias, p1, p2, label, norm_score, detector_score)
    d = img_feats.shape[1] // 2
    summed = img_feats[:, :d] + img_feats[:, d:]  # ijb_data caches the float32 flip sum, as the script's array
    feats, ids = template_features(summed, templates, medias, faceness, norm_score, detector_score, chunk_rows=50)
    out = evaluate_scores(label, pair_scores(feats, ids, p1, p2, block=7))
    assert ["%.2f" % (v * 100) for v in out["tar_at_fars"].values()] == row
    assert "%0.4f" % (out["auc"] * 100) == auc_text
    assert len(set(row)) >= 3 and 100 < label.sum() < len(label) - 3000  # a real ROC, not a degenerate one


def test_ijb_all_scores_equal_and_non_finite_features():
    labels = np.arange(1000) % 3 == 0
    out = evaluate_scores(labels, np.full(1000, 0.3))  # eval_ijbc.py: ROC (0, 0), (1, 1): FPR 0 nearest every target
    assert set(out["tar_at_fars"].values()) == {0.0} and out["auc"] == 0.5
    scores = np.linspace(-1, 1, 1000)
    scores[4] = np.nan
    with pytest.raises(DataError, match="1 of the 1000 pair scores are not finite .NaN/inf., the first pair 4"):
        evaluate_scores(labels, scores)
    feats = np.ones((4, 3), np.float32)
    feats[2] = 0  # norm 0: eval_ijbc.py's x / sqrt(sum(x ** 2)) is NaN with use_norm_score=False
    with pytest.raises(DataError, match="template 8 .1 of 2 templates. has a non-finite feature"):
        template_features(feats, [7, 7, 8, 8], [1, 2, 3, 3], None, norm_score=False, detector_score=False)


# ---- ijb_evals.py 1:N, step by step ----------------------------------------------------------------------------------
def ijb_evals_templates(img_feats, templates, medias, choose_templates, choose_ids):
    """image2template_feature (1:N): the templates of a 1:N file, each one's subject from its first row."""
    unique_templates, indices = np.unique(choose_templates, return_index=True)
    feats = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face_medias = medias[ind_t]
        media_feats = [np.mean(img_feats[ind_t][face_medias == u], 0, keepdims=True) for u in np.unique(face_medias)]
        feats[count] = np.sum(np.array(media_feats), 0)
    return normalize(feats), choose_ids[indices]


def ijb_evals_search(query_feats, gallery_feats, query_ids, reg_ids, fars):
    """evaluation_1N: (top-1, top-5, top-10 counts, recalls)."""
    similarity = np.dot(query_feats, gallery_feats.T)
    top = [0, 0, 0]
    pos_sims, neg_sims, non_gallery_sims = [], [], []
    for index, query_id in enumerate(query_ids):
        if query_id in reg_ids:
            gallery_label = np.argwhere(reg_ids == query_id)[0, 0]
            index_sorted = np.argsort(similarity[index])[::-1]
            top = [c + (gallery_label in index_sorted[:k]) for c, k in zip(top, (1, 5, 10))]
            pos_sims.append(similarity[index][reg_ids == query_id][0])
            neg_sims.append(similarity[index][reg_ids != query_id])
        else:
            non_gallery_sims.append(similarity[index])
    pos_sims, neg_sims, non_gallery_sims = np.array(pos_sims), np.array(neg_sims), np.array(non_gallery_sims)
    correct_pos_cond = pos_sims > neg_sims.max(1)
    non_gallery_sims_sorted = np.sort(non_gallery_sims.max(1))[::-1]
    recalls = []
    for far in fars:
        thresh = non_gallery_sims_sorted[max(int((non_gallery_sims_sorted.shape[0]) * far) - 1, 0)]
        recalls.append(np.logical_and(correct_pos_cond, pos_sims > thresh).sum() / pos_sims.shape[0])
    return top, recalls


def test_ijb_1n_from_images_matches_run_model_test_1n():
    """run_model_test_1N (flip, norm kept, faceness): templates pooled per 1:N file, both galleries, the mean."""
    img_feats, faceness, templates, medias, _, _, _ = ijb_like(4, subjects=40, templates=160)
    d = img_feats.shape[1] // 2
    summed = img_feats[:, :d] + img_feats[:, d:]
    weighted = summed * faceness[:, None]  # process_embeddings(use_norm_score=False, use_detector_score=True)
    rng = np.random.default_rng(4)
    unique = np.unique(templates)
    subject_of = dict(zip(unique.tolist(), rng.integers(0, 40, len(unique)).tolist()))
    subject_of.update({t: 1000 + t for t in unique[:40].tolist()})  # 40 gallery templates, one per subject
    g1, g2, probe = unique[:20], unique[20:40], unique[40:]
    for t in probe.tolist():  # every probe's subject in exactly one gallery
        subject_of[t] = subject_of[int(unique[rng.integers(0, 40)])]
    rows = {name: templates[np.isin(templates, ts)] for name, ts in (("G1", g1), ("G2", g2), ("probe", probe))}
    ids = {name: np.array([subject_of[int(t)] for t in r]) for name, r in rows.items()}
    fars = (0.01, 0.1)

    feats = {name: ijb_evals_templates(weighted, templates, medias, rows[name], ids[name]) for name in rows}
    counts, recalls = {}, {}
    for g in ("G1", "G2"):
        counts[g], recalls[g] = ijb_evals_search(feats["probe"][0], feats[g][0], feats["probe"][1], feats[g][1], fars)
    query_num = len(probe)

    tmpl, unique_ids = template_features(summed, templates, medias, faceness)
    protocol = {name: ("-", *np.unique(np.c_[rows[name], ids[name]], axis=0).T) for name in rows}
    got = evaluate_identification(tmpl, unique_ids, protocol, "ijbc", fpirs=fars)["mean"]
    want_ranks = [(counts["G1"][i] + counts["G2"][i]) / query_num for i in range(3)]
    assert [f"{got[k]:.4f}" for k in ("rank_1", "rank_5", "rank_10")] == [f"{v:.4f}" for v in want_ranks]
    want_tpir = (np.array(recalls["G1"]) + np.array(recalls["G2"])) / 2
    assert [f"{v:.4f}" for v in got["tpir_at_fpir"].values()] == [f"{v:.4f}" for v in want_tpir]
    assert 0 < want_ranks[0] < 1 and 0 < want_tpir[1] < 1  # not degenerate


# ---- what `marginlab eval` prints ------------------------------------------------------------------------------------
def test_eval_prints_the_far_the_tar_was_measured_at():
    from marginlab.eval.standalone import verification_line

    rng = np.random.default_rng(0)
    same = np.arange(600) % 2 == 0
    r = evaluate_distances(np.where(same, rng.normal(1.0, 0.3, 600), rng.normal(1.8, 0.3, 600)), same, far_target=0.01)
    line = verification_line("lfw", r)
    assert line == (
        f"lfw: acc {r['accuracy']:.4f} +- {r['accuracy_std']:.4f}, TAR@FAR=1e-02 {r['tar_at_far']:.4f}, "
        f"AUC {r['auc']:.4f}, EER {r['eer']:.4f}"
    )  # (it printed "TAR@FAR=1e-3" whatever verification.<set>.far_target was)
