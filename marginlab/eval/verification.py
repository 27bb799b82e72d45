"""Face verification: InsightFace's protocol (``recognition/arcface_torch/eval/verification.py``).

Embedding of an image = backbone(image) + backbone(mirrored image) (``flip``), L2-normalised. A pair's
score is the squared Euclidean distance of its two embeddings (in [0, 4]); "same" is predicted when
``dist < threshold``. Accuracy: the pairs are cut into ``nfolds`` contiguous folds (sklearn ``KFold``
without shuffling); for each fold the threshold of ``arange(0, 4, 0.01)`` with the best accuracy on the
other folds (first best) is applied to it; the mean and population std of the fold accuracies are
reported (a warning, in the result and the log, when the grid is too coarse for the distances). ``tpr`` /
``fpr``: the fold average of the test-fold (TPR, FPR) at each grid threshold (InsightFace's); ``exact_tpr`` /
``exact_fpr``: sklearn's exact ROC over every distinct distance, which the ROC figure draws.

Differences, each stated where computed: TAR@FAR picks, per fold, the largest threshold of
``arange(0, 4, 0.001)`` whose training FAR is <= the target (InsightFace interpolates the inverse of the
FAR step function with ``scipy.interpolate.interp1d``: with scipy 1.8 a threshold up to 0.001 above ours,
so its TAR is the same or a little higher; scipy 1.10 on refuses the repeated FAR values); AUC and EER
are exact (sklearn ``roc_curve`` / ``auc`` over every distinct distance), not from the threshold grid. When
every pair is of one kind they and TAR@FAR (with its FAR) are undefined: NaN, with the reason under
``undefined``. Non-finite embeddings (NaN/inf) are a ``DataError`` naming the first such pair (InsightFace:
sklearn's ValueError).
Settings InsightFace takes as they come are refused first, a ``ConfigError`` naming the value: ``far_target``
outside (0, 1) (a negative one gave TAR 0), ``nfolds`` not an integer >= 1 or above the pairs of either kind.
"""

from __future__ import annotations

import logging
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.data.face import normalize_face
from marginlab.errors import ConfigError, DataError

ACC_THRESHOLDS = np.arange(0, 4, 0.01)  # evaluate(): thresholds = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # evaluate(): thresholds = np.arange(0, 4, 0.001) for calculate_val
GRID_LOSS = 0.01  # grid_warning: the accuracy the 0.01 grid may lose against an exact threshold before it warns

log = logging.getLogger(__name__)


# ---- the settings: refused before anything is computed -------------------------------------------------------
def check_far_target(value, key: str = "far_target") -> float:
    """The FAR at which TAR is read (InsightFace ``calculate_val``'s ``far_target``, 1e-3): a number in (0, 1);
    below 0 no threshold qualifies (TAR 0), 0 and 1 are the ends of the ROC, not a rate to operate at."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ConfigError(
            f"{key}={value!r} is not allowed: it must be a number in (0, 1), a false accept rate (e.g. 1e-3)"
        )
    return float(value)


def check_nfolds(value, key: str = "nfolds", optional: bool = False) -> int | None:
    """The number of folds (InsightFace ``nrof_folds``): an integer >= 1 (``optional``: or None, the set's own)."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "an integer >= 1" + (" or null (the set's own folds)" if optional else "")
        raise ConfigError(f"{key}={value!r} is not allowed: it must be {allowed}")
    return int(value)


def check_nfolds_fit(nfolds: int, issame: np.ndarray, key: str = "nfolds") -> None:
    """``nfolds`` at most the pairs of each kind present: more folds than same (or different) pairs leaves a test
    fold without that kind, which scores its TAR (or FAR) 0 and biases the fold means. A set of one kind only
    (AUC/EER undefined) is bounded by its pair count, as ``kfold``."""
    if issame.size == 0:  # refused by evaluate_distances: "must be non-empty"
        return
    same = int(np.count_nonzero(issame))
    counts = [c for c in (same, issame.size - same) if c]
    limit = min(counts) if counts else 0
    if nfolds > limit:
        raise ConfigError(
            f"{key}={nfolds!r} is not allowed: it must be an integer in [1, {limit}], at most the pairs of either "
            f"kind ({same} same-identity, {issame.size - same} different-identity)"
        )


# ---- embeddings -----------------------------------------------------------------------------------------
@torch.no_grad()
def embed_images(
    backbone: nn.Module,
    images: Tensor,
    batch_size: int = 256,
    flip: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """L2-normalised embeddings (float32, on the CPU) of ``images`` (N x C x H x W).

    ``images``: uint8 (normalised here, ``(x / 255 - 0.5) / 0.5``) or float (used as given). With ``flip``
    each embedding is backbone(x) + backbone(x mirrored) before normalising. The backbone runs in eval
    mode and its previous mode is restored.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} is not allowed: it must be an integer >= 1")
    if device is None:
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for lo in range(0, images.shape[0], batch_size):
            x = images[lo : lo + batch_size].to(device, non_blocking=True)
            x = normalize_face(x) if x.dtype == torch.uint8 else x.float()
            emb = backbone(x).float()
            if flip:
                emb = emb + backbone(x.flip(-1)).float()
            out.append(F.normalize(emb, dim=1).cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def embed_pairs(
    backbone: nn.Module,
    images: Tensor,
    batch_size: int = 256,
    flip: bool = True,
    device: torch.device | str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(emb1, emb2), each N x D float32 numpy, for the 2N images of N pairs (pair i = images 2i, 2i+1)."""
    if images.shape[0] % 2:
        raise ConfigError(f"pair images must come in twos (pair i = images 2i and 2i+1), got {images.shape[0]}")
    emb = embed_images(backbone, images, batch_size, flip, device).numpy()
    return emb[0::2], emb[1::2]


# ---- the protocol ---------------------------------------------------------------------------------------
def kfold(n: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """sklearn ``KFold(n_splits, shuffle=False)`` (InsightFace's ``LFold``): contiguous test folds, the first
    ``n % k`` one larger. ``nfolds == 1`` gives (all, all), as ``LFold``."""
    if isinstance(nfolds, bool) or not isinstance(nfolds, int) or nfolds < 1 or nfolds > n:
        raise ConfigError(f"nfolds={nfolds!r} is not allowed: it must be an integer in [1, {n}] (the pair count)")
    idx = np.arange(n)
    if nfolds == 1:
        return [(idx, idx)]
    # imported here: sklearn (SciPy) cost `marginlab train` seconds of start-up (#16)
    from sklearn.model_selection import KFold

    return list(KFold(n_splits=nfolds, shuffle=False).split(idx))


def _counts(thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray):
    """For every threshold t: true accepts (same, dist < t) and false accepts (different, dist < t)."""
    pos, neg = np.sort(dist[issame]), np.sort(dist[~issame])
    return (
        np.searchsorted(pos, thresholds, side="left"),
        np.searchsorted(neg, thresholds, side="left"),
        len(pos),
        len(neg),
    )


def _rates(thresholds, dist, issame):
    """(tpr, fpr, accuracy) per threshold, as InsightFace's ``calculate_accuracy`` (0 when undefined)."""
    tp, fp, n_pos, n_neg = _counts(thresholds, dist, issame)
    tpr = tp / n_pos if n_pos else np.zeros(len(thresholds))
    fpr = fp / n_neg if n_neg else np.zeros(len(thresholds))
    acc = (tp + (n_neg - fp)) / len(dist)
    return tpr, fpr, acc


def calculate_roc(dist: np.ndarray, issame: np.ndarray, nfolds: int = 10, thresholds: np.ndarray = ACC_THRESHOLDS):
    """InsightFace ``calculate_roc`` (pca=0): per-fold best threshold on the training folds (first maximum),
    accuracy on the test fold. Returns (tpr, fpr averaged over folds, fold accuracies, fold thresholds)."""
    folds = kfold(len(dist), nfolds)
    tprs = np.zeros((nfolds, len(thresholds)))
    fprs = np.zeros((nfolds, len(thresholds)))
    accuracy, best = np.zeros(nfolds), np.zeros(nfolds)
    for f, (train, test) in enumerate(folds):
        _, _, acc_train = _rates(thresholds, dist[train], issame[train])
        k = int(np.argmax(acc_train))
        tprs[f], fprs[f], acc_test = _rates(thresholds, dist[test], issame[test])
        accuracy[f], best[f] = acc_test[k], thresholds[k]
    return tprs.mean(0), fprs.mean(0), accuracy, best


def calculate_val(
    dist: np.ndarray,
    issame: np.ndarray,
    far_target: float = 1e-3,
    nfolds: int = 10,
    thresholds: np.ndarray = VAL_THRESHOLDS,
):
    """TAR at FAR = ``far_target``: per fold, the largest threshold whose FAR on the training folds is at most
    the target (FAR only grows with the threshold), applied to the test fold. Returns (TAR mean, TAR std,
    achieved FAR mean).

    A deliberate difference: InsightFace's ``calculate_val`` sets ``threshold = interp1d(far_train, thresholds,
    kind='slinear')(far_target)``. With scipy 1.8 that is our threshold when a training FAR equals the target, else
    our threshold plus the linear share of the next 0.001 step, so its TAR is the same or higher (0 to 0.2 points
    on 6,000 LFW-like pairs, seeded, at TAR 0.76-0.99: ``tests/eval/test_protocol_oracles.py``); scipy 1.10 on
    refuses the repeated FAR values (insightface issue #2152). It also uses threshold 0 when the target is never
    reached. Ours stops at a threshold whose training FAR was measured, never between grid points."""
    far_target = check_far_target(far_target)
    val, far = np.zeros(nfolds), np.zeros(nfolds)
    for f, (train, test) in enumerate(kfold(len(dist), nfolds)):
        _, fp, _, n_neg = _counts(thresholds, dist[train], issame[train])
        far_train = fp / n_neg if n_neg else np.zeros(len(thresholds))
        k = max(int(np.searchsorted(far_train, far_target, side="right")) - 1, 0)
        tp, fp, n_pos, n_neg = _counts(thresholds[k : k + 1], dist[test], issame[test])
        val[f] = tp[0] / n_pos if n_pos else 0.0
        far[f] = fp[0] / n_neg if n_neg else 0.0
    return float(val.mean()), float(val.std()), float(far.mean())


def exact_roc(dist: np.ndarray, issame: np.ndarray, drop_intermediate: bool = False):
    """sklearn's exact ROC over every distinct distance (accept ``dist <= d``, i.e. score ``-dist``), from (0, 0):
    (fpr, tpr, distance thresholds, the first -inf). ``drop_intermediate`` drops the collinear points (sklearn)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, scores = roc_curve(issame, -dist, drop_intermediate=drop_intermediate)
    return fpr, tpr, -scores


def auc_eer(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Exact ROC AUC (sklearn ``auc``: trapezoids over the exact ROC = Mann-Whitney with half credit for ties) and
    the equal error rate (FPR = 1 - TPR, linearly interpolated between the two ROC points around the crossing)."""
    if issame.all() or not issame.any():
        return float("nan"), float("nan")
    fpr, tpr, _ = exact_roc(dist, issame)
    from sklearn.metrics import auc

    area = float(auc(fpr, tpr))
    gap = fpr - (1 - tpr)  # rises from -1 at (0, 0) to 0 at (1, 1)
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0 or k == 0:
        return area, float(fpr[k])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    return area, float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def best_accuracies(dist: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(best accuracy over all pairs at a threshold of the protocol's grid, best at any exact threshold)."""
    grid = float(_rates(ACC_THRESHOLDS, dist, issame)[2].max())
    n_pos = int(issame.sum())
    n_neg = len(issame) - n_pos
    if not n_pos or not n_neg:
        return grid, 1.0
    fpr, tpr, _ = exact_roc(dist, issame)
    return grid, float(np.max(tpr * n_pos + (1 - fpr) * n_neg) / len(dist))


def grid_warning(dist: np.ndarray, issame: np.ndarray) -> str | None:
    """A warning when the accuracy grid (step 0.01) is too coarse for these distances: its best accuracy over all
    pairs is more than ``GRID_LOSS`` below what an exact threshold reaches (e.g. every distance below 0.01)."""
    grid, exact = best_accuracies(dist, issame)
    if exact - grid <= GRID_LOSS:
        return None
    step = float(ACC_THRESHOLDS[1] - ACC_THRESHOLDS[0])
    return (
        f"the pair distances (range [{dist.min():.4g}, {dist.max():.4g}]) fall below the resolution of the "
        f"accuracy protocol's threshold grid (step {step:g}): its best accuracy over all pairs is {grid:.4f}, "
        f"an exact threshold reaches {exact:.4f}; the k-fold accuracy is limited by the grid (AUC, EER and the "
        f"ROC figure are exact)"
    )


def check_settings(nfolds, far_target, issame: np.ndarray, check_kinds: bool = True) -> tuple[int, float]:
    """``nfolds`` and ``far_target`` checked (one ConfigError naming the bad value); ``check_kinds``: ``nfolds`` at
    most the pairs of either kind (False: a set's own folds, bounded by its pair count only, in ``kfold``)."""
    nfolds, far_target = check_nfolds(nfolds), check_far_target(far_target)
    if check_kinds:
        check_nfolds_fit(nfolds, issame)
    return nfolds, far_target


def evaluate_distances(dist, issame, nfolds: int = 10, far_target: float = 1e-3, *, check_kinds: bool = True) -> dict:
    """The protocol on precomputed squared distances (N) and labels (N bool). See ``evaluate``."""
    dist = np.asarray(dist, dtype=np.float64).ravel()
    issame = np.asarray(issame).astype(bool).ravel()
    if dist.shape != issame.shape or dist.size == 0:
        raise ConfigError(f"distances ({dist.size}) and issame ({issame.size}) must be non-empty and of equal length")
    nfolds, far_target = check_settings(nfolds, far_target, issame, check_kinds)
    bad = np.flatnonzero(~np.isfinite(dist))
    if bad.size:  # InsightFace: sklearn normalize's "Input contains NaN" ValueError, a deep stack trace
        raise DataError(
            f"{bad.size} of the {dist.size} pair distances are not finite (NaN or inf), the first at pair "
            f"{int(bad[0])}: its embeddings hold NaN/inf (a diverged backbone, or an overflow in its output)"
        )
    tpr, fpr, accuracy, best = calculate_roc(dist, issame, nfolds)
    tar, tar_std, far = calculate_val(dist, issame, far_target, nfolds)
    area, eer = auc_eer(dist, issame)
    result = {
        "accuracy": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std()),
        "accuracies": accuracy,
        "threshold": float(best.mean()),
        "thresholds": best,
        "tar_at_far": tar,
        "tar_at_far_std": tar_std,
        "far": far,
        "far_target": float(far_target),
        "auc": area,
        "eer": eer,
        "tpr": tpr,
        "fpr": fpr,
        "roc_thresholds": ACC_THRESHOLDS.copy(),
        "nfolds": int(nfolds),
        "num_pairs": int(dist.size),
        "warnings": [],
    }
    if issame.all() or not issame.any():
        kind = "same-identity" if issame.all() else "different-identity"
        why = f"undefined: every one of the {dist.size} pairs is a {kind} pair (an ROC needs both kinds)"
        result["undefined"] = {key: why for key in ("auc", "eer", "tar_at_far", "tar_at_far_std", "far")}
        result.update(tar_at_far=float("nan"), tar_at_far_std=float("nan"), far=float("nan"))  # was TAR 1.0 / 0.0
    else:  # the exact ROC (sklearn roc_curve), collinear points dropped: what the ROC figure draws
        result["exact_fpr"], result["exact_tpr"], _ = exact_roc(dist, issame, drop_intermediate=True)
        warning = grid_warning(dist, issame)
        if warning:
            result["warnings"].append(warning)
            log.warning("verification: %s", warning)
    return result


def evaluate(
    emb1, emb2, issame, nfolds: int = 10, far_target: float = 1e-3, normalize: bool = True, *, check_kinds: bool = True
) -> dict:
    """Verification metrics for pairs (emb1[i], emb2[i]) with ground truth ``issame[i]``.

    Keys: ``accuracy`` (mean over folds), ``accuracy_std`` (population std), ``accuracies`` and
    ``thresholds`` (per fold), ``threshold`` (mean best threshold), ``tar_at_far`` (+ ``_std``) at
    ``far_target`` with ``far`` the FAR it achieved, ``auc``, ``eer``, and the fold-averaged ROC arrays
    ``tpr``, ``fpr`` over ``roc_thresholds``. Embeddings are L2-normalised first (``normalize``), as the
    thresholds assume unit vectors. ``nfolds`` (an integer >= 1, at most the pairs of either kind unless
    ``check_kinds`` is False) and ``far_target`` (in (0, 1)) are checked first: a ConfigError naming the bad value.
    """
    check_settings(nfolds, far_target, np.asarray(issame).astype(bool).ravel(), check_kinds)
    e1 = np.asarray(emb1, dtype=np.float64)
    e2 = np.asarray(emb2, dtype=np.float64)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ConfigError(f"emb1 {e1.shape} and emb2 {e2.shape} must both be N x D")
    with np.errstate(invalid="ignore"):  # a NaN/inf row gives a NaN distance: evaluate_distances names it
        if normalize:
            e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
            e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
        dist = np.sum(np.square(e1 - e2), axis=1)
    return evaluate_distances(dist, issame, nfolds, far_target, check_kinds=check_kinds)
