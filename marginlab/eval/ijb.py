"""IJB-B / IJB-C 1:1 verification: the protocol of InsightFace's ``recognition/arcface_torch/eval_ijbc.py``.

Each image's feature is the backbone's raw output on the aligned crop (``marginlab.data.face.align``), plus that
of the mirrored crop (``flip``, "F2": features summed). With ``norm_score`` the feature's norm is kept (else the
feature is L2-normalised, "N0"); with ``detector_score`` it is multiplied by the image's faceness score ("D1").
Features are averaged within a media (the frames of one video, or a single still) and the media features summed
within a template; template features are L2-normalised and a template pair's score is their cosine. From the
scores of every pair: sklearn's ``roc_curve`` (and ``auc``), and TAR at FAR 1e-6 ... 1e-1 read at the ROC point
whose FPR is nearest the target (ties: the later ROC point, i.e. the larger TPR, as the script's ``flipud`` and
``min`` over (|fpr - target|, index) do). InsightFace's defaults: flip, norm_score and detector_score all true.

The functions take plain arrays so other implementations can be checked against them; ``IJBTarget`` is what
``verification=[ijbb]`` / ``[ijbc]`` builds (data: ``marginlab.eval.ijb_data``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.metrics import auc, roc_curve
from sklearn.preprocessing import normalize

from marginlab.errors import ConfigError, DataError
from marginlab.eval.verification import check_far_target

log = logging.getLogger(__name__)

#: the FAR columns of eval_ijbc.py's table (``x_labels``)
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: the FAR reported as the set's ``tar_at_far`` scalar: IJB-C's headline column in ArcFace-era papers
HEADLINE_FAR = 1e-4
#: image rows processed at a time when pooling features into templates (bounded memory on IJB-C's 469k images)
CHUNK_ROWS = 65536


def image_features(
    features: np.ndarray, faceness: np.ndarray | None = None, norm_score: bool = True, detector_score: bool = True
) -> np.ndarray:
    """The per-image features that go into the templates (float64): ``features`` (N x D, flip already summed),
    L2-normalised unless ``norm_score`` (eval_ijbc.py ``use_norm_score``), times ``faceness`` when
    ``detector_score`` (``use_detector_score``: ``img_input_feats * faceness_scores[:, np.newaxis]``)."""
    feats = np.asarray(features, dtype=np.float64)
    if not norm_score:  # eval_ijbc.py: img_input_feats / sqrt(sum(img_input_feats ** 2, -1))
        with np.errstate(invalid="ignore", divide="ignore"):  # a norm-0 row turns NaN: template_features names it
            feats = feats / np.sqrt(np.sum(feats**2, -1, keepdims=True))
    if detector_score:
        if faceness is None:
            raise ConfigError("detector_score=true needs the faceness scores (the last column of the 5pts file)")
        feats = feats * np.asarray(faceness, dtype=np.float64)[:, None]
    return feats


def template_features(
    features: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    faceness: np.ndarray | None = None,
    norm_score: bool = True,
    detector_score: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised template features T x D float64, the sorted template ids T) from image ``features``
    (N x D, e.g. a memory-mapped .npy, read ``chunk_rows`` rows at a time) and each image's template and media.

    eval_ijbc.py ``image2template_feature``: a template's feature is the sum over its medias of the mean of that
    media's image features (a media id is grouped within its template), then ``sklearn.preprocessing.normalize``.
    Computed as one pass: template += image feature / (images of its media in that template).
    """
    templates = np.asarray(templates, dtype=np.int64).ravel()
    medias = np.asarray(medias, dtype=np.int64).ravel()
    n = len(templates)
    if features.ndim != 2 or features.shape[0] != n or len(medias) != n:
        raise ConfigError(
            f"features {features.shape}, templates ({n}) and medias ({len(medias)}) must agree: "
            "one template and one media id per image"
        )
    unique_templates, t_index = np.unique(templates, return_inverse=True)
    _, group, counts = np.unique(np.stack([t_index, medias]), axis=1, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[group.ravel()]  # mean within a media (np.mean in image2template_feature)
    out = np.zeros((len(unique_templates), features.shape[1]), dtype=np.float64)
    for lo in range(0, n, chunk_rows):
        hi = min(lo + chunk_rows, n)
        feats = image_features(
            features[lo:hi], None if faceness is None else faceness[lo:hi], norm_score, detector_score
        )
        pool = csr_matrix((weight[lo:hi], (t_index[lo:hi], np.arange(hi - lo))), shape=(len(out), hi - lo))
        out += pool @ feats  # sum over medias of the media means (np.sum(media_norm_feats) in the script)
    bad = np.flatnonzero(~np.isfinite(out).all(1))
    if bad.size:  # eval_ijbc.py: sklearn normalize's "Input contains NaN" ValueError
        raise DataError(
            f"template {int(unique_templates[bad[0]])} ({bad.size} of {len(out)} templates) has a non-finite feature "
            "(NaN/inf): an image feature of it is NaN/inf, or has norm 0 with norm_score=false"
        )
    return normalize(out), unique_templates


def template_rows(unique_templates: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each template id in ``unique_templates`` (sorted); KeyError naming the first unknown id."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    rows = np.searchsorted(unique_templates, ids)
    rows = np.minimum(rows, len(unique_templates) - 1)
    unknown = np.flatnonzero(unique_templates[rows] != ids)
    if unknown.size:
        raise KeyError(f"template {int(ids[unknown[0]])} (pair {int(unknown[0])}) has no image")
    return rows


def pair_scores(
    template_feats: np.ndarray, unique_templates: np.ndarray, t1: np.ndarray, t2: np.ndarray, block: int = 1024
) -> np.ndarray:
    """Cosine of each template pair: the dot product of the L2-normalised template features (eval_ijbc.py
    ``verification``: ``np.sum(feat1 * feat2, -1)``). Read from ``block`` rows of the template Gram matrix at a
    time: IJB-C's 15.7M pairs among 23k templates cost one matrix product, not 31M gathered rows."""
    r1, r2 = template_rows(unique_templates, t1), template_rows(unique_templates, t2)
    score = np.empty(len(r1), dtype=np.float64)
    order = np.argsort(r1, kind="stable")
    bounds = np.searchsorted(r1[order], np.arange(0, len(unique_templates) + block, block))
    for b, lo in enumerate(range(0, len(unique_templates), block)):
        pairs = order[bounds[b] : bounds[b + 1]]
        if pairs.size:
            gram = template_feats[lo : lo + block] @ template_feats.T
            score[pairs] = gram[r1[pairs] - lo, r2[pairs]]
    return score


def tar_at_far(labels: np.ndarray, scores: np.ndarray, far_targets=FAR_TARGETS) -> dict[float, float]:
    """TAR at each target FAR: the TPR of the ``roc_curve`` point whose FPR is nearest the target; of equally
    near points the last one on sklearn's curve (eval_ijbc.py: ``fpr, tpr = flipud(fpr), flipud(tpr)``, then
    ``min(zip(abs(fpr - target), range(len(fpr))))`` -- the first of the flipped arrays)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {float(t): float(tpr[int(np.argmin(np.abs(fpr - t)))]) for t in far_targets}  # argmin: first minimum


def sampled_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = 400, lowest: float = 1e-7):
    """The ROC at ``points`` log-spaced FPRs from ``lowest`` to 1 (the best TPR at FPR <= each), plus (0, 0) and
    (1, 1): a curve small enough for JSON and a figure (IJB-C's exact ROC has up to millions of points)."""
    grid = np.logspace(np.log10(lowest), 0.0, points)
    best = np.maximum.accumulate(tpr)  # roc_curve's fpr is non-decreasing: best TPR reached by each point
    k = np.searchsorted(fpr, grid, side="right") - 1
    keep = k >= 0
    return (np.concatenate(([0.0], grid[keep], [1.0])), np.concatenate(([0.0], best[k[keep]], [1.0])))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The FAR where FAR = 1 - TAR, linearly interpolated along the ROC polyline (the gap FAR - (1 - TAR) only
    grows along sklearn's curve, from -1 at (0, 0) to 0 at (1, 1))."""
    gap = fpr - (1.0 - tpr)
    k = int(np.argmax(gap >= 0))
    if k == 0 or gap[k] == 0:
        return float(fpr[k])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def evaluate_scores(
    labels: np.ndarray, scores: np.ndarray, far_targets=FAR_TARGETS, headline_far: float = HEADLINE_FAR
) -> dict:
    """TAR at each FAR (``tar_at_fars``, keyed ``"1e-06"``...), ``tar_at_far`` at ``headline_far``, AUC
    (sklearn ``auc`` of ``roc_curve``, as eval_ijbc.py), EER, and a sampled ROC (``fpr``, ``tpr``)."""
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape or labels.size == 0:
        raise ConfigError(f"labels ({labels.size}) and scores ({scores.size}) must be non-empty and of equal length")
    if labels.all() or not labels.any():
        raise ConfigError("the pairs must hold both genuine (label 1) and impostor (label 0) pairs for a ROC")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:  # eval_ijbc.py: roc_curve's "Input contains NaN" ValueError
        raise DataError(
            f"{bad.size} of the {scores.size} pair scores are not finite (NaN/inf), the first pair {bad[0]}"
        )
    targets = tuple(sorted({float(t) for t in far_targets} | {float(headline_far)}))
    tars = tar_at_far(labels, scores, targets)
    fpr, tpr, _ = roc_curve(labels, scores)
    roc_fpr, roc_tpr = sampled_roc(fpr, tpr)
    return {
        "tar_at_fars": {f"{t:.0e}": tars[t] for t in sorted(far_targets)},
        "tar_at_far": tars[headline_far],
        "far_target": float(headline_far),
        "auc": float(auc(fpr, tpr)),
        "eer": equal_error_rate(fpr, tpr),
        "fpr": roc_fpr,
        "tpr": roc_tpr,
        "num_pairs": int(labels.size),
        "num_genuine": int(labels.sum()),
    }


def check_fars(name: str, far_targets, headline_far) -> tuple[list[float], float]:
    """``far_targets`` (a list of FARs, eval_ijbc.py's ``x_labels``) and ``headline_far``, each a number in (0, 1),
    as floats; else a ConfigError naming the key and the bad value (a string, a bool, NaN, 0, a negative)."""
    from omegaconf import ListConfig  # Hydra hands the list over as a ListConfig unless converted

    key = f"verification.{name}.far_targets"
    if not isinstance(far_targets, (list, tuple, ListConfig)):
        raise ConfigError(f"{key}={far_targets!r} is not allowed: it must be a list of FARs in (0, 1), e.g. [1e-4]")
    targets = [check_far_target(t, f"{key}[{i}]") for i, t in enumerate(far_targets)]
    return targets, check_far_target(headline_far, f"verification.{name}.headline_far")


@dataclass
class IJBTarget:
    """What ``configs/verification/ijbb.yaml`` / ``ijbc.yaml`` build: an IJB set to read lazily and score.

    ``root``: the IJB release folder (``meta/``, ``loose_crop/``); ``name``: ``ijbb`` or ``ijbc`` (the meta
    files' prefix). ``flip``, ``norm_score``, ``detector_score``: the protocol's options (InsightFace's defaults
    true). ``cache_dir``: where image features are kept (keyed by the weights, ``flip`` and the input size), so a
    re-run with other ``norm_score``/``detector_score`` does not embed again; ``marginlab eval`` puts them beside
    the checkpoint (``<dir>/ijb_features``) when unset; unset during training (the weights change every epoch).
    """

    name: str
    root: str
    flip: bool = True
    norm_score: bool = True
    detector_score: bool = True
    batch_size: int = 128
    num_workers: int = 4
    cache_dir: str | None = None
    far_targets: list = field(default_factory=lambda: list(FAR_TARGETS))
    headline_far: float = HEADLINE_FAR
    identification: bool = False  # also the 1:N search protocol (marginlab.eval.ijb_identification)
    progress: bool | None = None  # None: a progress bar on a terminal
    _meta: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in ("ijbb", "ijbc"):
            raise ConfigError(
                f"verification.{self.name}.name={self.name!r} is not allowed: choose ijbb or ijbc "
                "(the prefix of the meta files)"
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(
                f"verification.{self.name}.batch_size={self.batch_size!r} is not allowed: an integer >= 1"
            )
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(
                f"verification.{self.name}.num_workers={self.num_workers!r} is not allowed: an integer >= 0"
            )
        if not isinstance(self.identification, bool):
            raise ConfigError(
                f"verification.{self.name}.identification={self.identification!r} is not allowed: true or false"
            )
        self.far_targets, self.headline_far = check_fars(self.name, self.far_targets, self.headline_far)

    def use_checkpoint(self, path: Path) -> None:
        """``marginlab eval``: cache the features beside the checkpoint unless ``cache_dir`` is set."""
        if self.cache_dir is None:
            self.cache_dir = str(Path(path).parent / "ijb_features")

    def flags(self) -> dict:
        return {
            "flip": bool(self.flip),
            "norm_score": bool(self.norm_score),
            "detector_score": bool(self.detector_score),
        }

    def load(self):
        """The set's meta files, read and checked once (``ijb_data.IJBMeta``)."""
        from marginlab.eval.ijb_data import read_meta

        if "meta" not in self._meta:
            self._meta["meta"] = read_meta(self.root, self.name)
        return self._meta["meta"]

    def run(self, backbone, image_size=112, device=None) -> dict:
        from marginlab.eval.ijb_data import image_features_cached

        meta = self.load()
        if self.identification:  # the 1:N files read (a missing one named) before the long embedding
            from marginlab.eval.ijb_identification import add_identification, read_1n_protocol

            search = read_1n_protocol(meta.root, self.name)
        features, cached = image_features_cached(
            meta,
            backbone,
            image_size,
            flip=bool(self.flip),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            device=device,
            cache_dir=self.cache_dir,
            progress=self.progress,
        )
        feats, ids = template_features(
            features,
            meta.templates,
            meta.medias,
            meta.faceness,
            norm_score=bool(self.norm_score),
            detector_score=bool(self.detector_score),
        )
        scores = pair_scores(feats, ids, meta.t1, meta.t2)
        result = evaluate_scores(meta.labels, scores, self.far_targets, self.headline_far)
        result.update(
            name=self.name,
            protocol="IJB 1:1, InsightFace eval_ijbc.py",
            flags=self.flags(),
            num_images=len(meta.images),
            num_templates=len(ids),
            features=str(cached) if cached else None,
        )
        result["scalars"] = {f"tar_at_far_{key}": value for key, value in result["tar_at_fars"].items()}
        flags = ", ".join(f"{k}={str(v).lower()}" for k, v in self.flags().items())
        result["summary"] = (
            f"{self.name}: TAR@FAR "
            + ", ".join(f"{k} {v:.4f}" for k, v in result["tar_at_fars"].items())
            + f"; AUC {result['auc']:.4f} ({flags})"
        )
        log.info("%s", result["summary"])
        if self.identification:
            add_identification(result, feats, ids, search, self.name)
        return result
