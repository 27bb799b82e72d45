"""IJB-B / IJB-C 1:N identification (search): InsightFace's ``recognition/_evaluation_/ijb/ijb_evals.py``
(``evaluation_1N``, ``run_model_test_1N``), the mixed-media 1:N protocol of the IJB-C paper (Maze et al. 2018).

Files (``<root>/meta/``, as both InsightFace 1:N scripts read them; one row per image, a header line, the first
two columns ``TEMPLATE_ID,SUBJECT_ID``): IJB-C ``ijbc_1N_gallery_G1.csv``, ``ijbc_1N_gallery_G2.csv``; IJB-B
``ijbb_1N_gallery_S1.csv``, ``ijbb_1N_gallery_S2.csv`` (the scripts' names for IJB-B's galleries); and
``<set>_1N_probe_mixed.csv``. Template features are those of the 1:1 protocol (``ijb.template_features``: media
mean, template sum, L2), a search's scores their cosines against every gallery template.

Each gallery is searched separately by every probe: a probe whose subject is in that gallery is a mated search,
the others are non-mated (each probe's subject is in exactly one of the two disjoint galleries). Metrics per
gallery (``evaluation_1N``): Rank-k (CMC) over the mated searches; TPIR at FPIR f: the threshold is the
``max(int(n * f) - 1, 0)``-th of the ``n`` non-mated searches' top scores sorted high to low, and TPIR is the share of
mated searches whose mate scores above every other gallery template and above that threshold. The two galleries'
numbers are combined as ``run_model_test_1N``: Rank-k hits of both over all probes, TPIR the mean of the two.
Where this differs from the paper's FPIR (the share of non-mated searches with a candidate at or above the
threshold), the script is followed: scores must exceed the threshold strictly, so the FPIR reached is below f
(``(int(n * f) - 1) / n``; 0 when ``n * f < 1``).

InsightFace's older ``ijb_1n.py`` instead searches G1 ∪ G2 at once (every probe mated) and sets the threshold on
all probe x non-mate-template scores (``ceil(probes * f)``-th largest) without a rank-1 condition: not the paper's
FPIR, which counts non-mated searches; not done here.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from marginlab.errors import DataError

log = logging.getLogger(__name__)

#: evaluation_1N's Rank-k columns (top1, top5, top10)
RANKS = (1, 5, 10)
#: the FPIRs of ijb_1n.py's ``Fars``
FPIRS = (0.01, 0.1)
#: the 1:N gallery files of each set (ijb_evals.py ``extract_gallery_prob_data``)
GALLERIES = {"ijbb": ("S1", "S2"), "ijbc": ("G1", "G2")}
#: probes searched at a time: a block of the probe x gallery score matrix (IJB-C: 19,593 x 1,772)
PROBE_BLOCK = 4096
COLUMNS = "'TEMPLATE_ID,SUBJECT_ID,...' rows under a header line"


def read_1n_templates(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(sorted template ids, each template's subject id) of a 1:N csv (one row per image). ijb_evals.py reads the
    first two columns below the header and keeps the subject of a template's first row (``np.unique(...,
    return_index=True)``); here a template whose rows name two subjects is an error."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: IJB 1:N file not found ({COLUMNS}; from the IJB release's meta/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the IJB 1:N file ({exc})") from None
    header = [c.strip().upper() for c in rows[0][:2]] if rows else []
    if header != ["TEMPLATE_ID", "SUBJECT_ID"]:
        raise DataError(f"{path}, line 1: header starts {rows[0][:2] if rows else []}, expected {COLUMNS}")
    ids = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        try:
            ids.append((int(row[0]), int(row[1])))
        except (ValueError, IndexError):
            raise DataError(f"{path}, line {n}: TEMPLATE_ID and SUBJECT_ID must be integers, got {row[:2]}") from None
    if not ids:
        raise DataError(f"{path}: no template rows ({COLUMNS})")
    pairs = np.unique(np.array(ids, dtype=np.int64), axis=0)  # distinct (template, subject), sorted by template
    twice = np.flatnonzero(np.diff(pairs[:, 0]) == 0)
    if twice.size:
        t = pairs[twice[0], 0]
        subjects = pairs[pairs[:, 0] == t, 1].tolist()
        raise DataError(f"{path}: template {t} has rows of subjects {subjects}; a template holds one subject")
    return pairs[:, 0], pairs[:, 1]


def identification_metrics(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    ranks=RANKS,
    fpirs=FPIRS,
    block: int = PROBE_BLOCK,
) -> dict:
    """Rank-k and TPIR at FPIR of searching one gallery (ijb_evals.py ``evaluation_1N``) from L2-normalised
    template features (P x D probes, G x D gallery) and subject ids (one gallery template per subject).

    ``rank_<k>``: the share of mated searches whose mate is among the k best-scoring templates (rank = 1 + the
    templates scoring strictly above the mate: ties go to the probe; the script's ``argsort`` order is arbitrary
    there); ``tpir_at_fpir`` (keyed ``"1e-02"``...) and its ``thresholds``: see the module docstring; None when no
    search is non-mated (no FPIR to set). ``rank_hits`` counts the mated searches within each rank.
    """
    probe_feats = np.asarray(probe_feats, dtype=np.float64)
    gallery_feats = np.asarray(gallery_feats, dtype=np.float64)
    probe_subjects = np.asarray(probe_subjects, dtype=np.int64).ravel()
    gallery_subjects = np.asarray(gallery_subjects, dtype=np.int64).ravel()
    if (
        probe_feats.ndim != 2
        or gallery_feats.ndim != 2
        or probe_feats.shape[1] != gallery_feats.shape[1]
        or len(probe_subjects) != len(probe_feats)
        or len(gallery_subjects) != len(gallery_feats)
        or not len(gallery_subjects)
    ):
        raise DataError(
            f"probe features {probe_feats.shape} / subjects ({len(probe_subjects)}) and gallery features "
            f"{gallery_feats.shape} / subjects ({len(gallery_subjects)}) must agree: one subject per template, "
            "the same feature size, a non-empty gallery"
        )
    order = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[order]
    dup = np.flatnonzero(np.diff(sorted_subjects) == 0)
    if dup.size:  # ijb_1n.py gen_mask: "RegIdsError"
        raise DataError(f"gallery subject {int(sorted_subjects[dup[0]])} has several templates; one per subject")
    at = np.minimum(np.searchsorted(sorted_subjects, probe_subjects), len(order) - 1)
    mated = sorted_subjects[at] == probe_subjects  # evaluation_1N: ``if query_id in reg_ids``
    mate_col = order[at]
    mated_idx = np.flatnonzero(mated)
    if not mated_idx.size:
        raise DataError("no probe's subject is in the gallery: nothing to identify")

    mate_score = np.empty(len(probe_subjects))
    best_other = np.empty(len(probe_subjects))  # highest non-mate score of a mated search
    top_score = np.empty(len(probe_subjects))  # highest score of a search (used for non-mated ones)
    rank = np.zeros(len(probe_subjects), dtype=np.int64)
    for lo in range(0, len(probe_subjects), block):
        hi = min(lo + block, len(probe_subjects))
        sim = probe_feats[lo:hi] @ gallery_feats.T  # evaluation_1N: np.dot(query_feats, gallery_feats.T)
        top_score[lo:hi] = sim.max(1)
        rows = np.flatnonzero(mated[lo:hi])
        cols = mate_col[lo:hi][rows]
        mate = sim[rows, cols]
        mate_score[lo + rows] = mate
        rank[lo + rows] = 1 + np.sum(sim[rows] > mate[:, None], axis=1)
        sim[rows, cols] = -np.inf  # evaluation_1N: neg_sims = similarity[index][reg_ids != query_id]
        best_other[lo + rows] = sim[rows].max(1)

    n_mated = len(mated_idx)
    hits = {k: int(np.sum(rank[mated_idx] <= k)) for k in ranks}  # top_k_count += label in index_sorted[:k]
    # correct_pos_cond = pos_sims > neg_sims.max(1): the mate strictly first
    first = mate_score[mated_idx] > best_other[mated_idx]
    nonmated_top = np.sort(top_score[~mated])[::-1]  # non_gallery_sims_sorted
    tpirs, thresholds = {}, {}
    for f in fpirs:
        key = f"{float(f):.0e}"
        if not nonmated_top.size:
            tpirs[key] = thresholds[key] = None
            continue
        # evaluation_1N: thresh = sorted[max(int(n * far) - 1, 0)]; recall = (correct & pos > thresh) / n_mated
        # (strictly above: the paper's "at or above" would count the threshold's own search; the script wins)
        th = float(nonmated_top[max(int(nonmated_top.size * float(f)) - 1, 0)])
        thresholds[key] = th
        tpirs[key] = float(np.sum(first & (mate_score[mated_idx] > th)) / n_mated)
    return {
        **{f"rank_{k}": hits[k] / n_mated for k in ranks},
        "tpir_at_fpir": tpirs,
        "thresholds": thresholds,
        "rank_hits": {f"rank_{k}": hits[k] for k in ranks},
        "num_probes": int(len(probe_subjects)),
        "num_mated": int(n_mated),
        "num_nonmated": int(len(probe_subjects) - n_mated),
        "num_gallery": int(len(gallery_subjects)),
    }


def mean_over_galleries(per_gallery: dict[str, dict]) -> dict:
    """The galleries' numbers combined as ijb_evals.py ``run_model_test_1N``: Rank-k = the galleries' Rank-k hits
    over all probes (``(g1_top_k_count + g2_top_k_count) / query_num``), TPIR = the galleries' mean
    (``(g1_recalls + g2_recalls) / 2``; None if a gallery has none)."""
    results = list(per_gallery.values())
    num_probes = results[0]["num_probes"]
    out = {key: sum(r["rank_hits"][key] for r in results) / num_probes for key in results[0]["rank_hits"]}
    out["tpir_at_fpir"] = {
        key: None
        if any(r["tpir_at_fpir"][key] is None for r in results)
        else float(np.mean([r["tpir_at_fpir"][key] for r in results]))
        for key in results[0]["tpir_at_fpir"]
    }
    return out


def protocol_paths(root: str | Path, name: str) -> dict[str, Path]:
    """The 1:N files of set ``name`` under ``<root>/meta/``: each gallery's and ``probe``'s."""
    meta = Path(root) / "meta"
    paths = {g: meta / f"{name}_1N_gallery_{g}.csv" for g in GALLERIES[name]}
    paths["probe"] = meta / f"{name}_1N_probe_mixed.csv"
    return paths


def read_1n_protocol(root: str | Path, name: str) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """Every 1:N file of the set read (a missing one named before any is read): name -> (path, templates,
    subjects)."""
    paths = protocol_paths(root, name)
    for path in paths.values():
        if not path.is_file():
            raise DataError(
                f"{path}: IJB 1:N file not found (verification.{name}.identification=true needs "
                f"{', '.join(p.name for p in paths.values())} in {path.parent})"
            )
    return {key: (path, *read_1n_templates(path)) for key, path in paths.items()}


def template_subset(template_feats, unique_templates, path: Path, templates: np.ndarray, tid_mid: str) -> np.ndarray:
    """The feature rows of ``templates`` (listed in ``path``); a DataError naming one without any image."""
    rows = np.minimum(np.searchsorted(unique_templates, templates), len(unique_templates) - 1)
    missing = np.flatnonzero(unique_templates[rows] != templates)
    if missing.size:
        raise DataError(
            f"{path}: template {int(templates[missing[0]])} has no image in {tid_mid} "
            f"({missing.size} of its {len(templates)} templates have none)"
        )
    return template_feats[rows]


def evaluate_identification(
    template_feats: np.ndarray, unique_templates: np.ndarray, protocol: dict, name: str, ranks=RANKS, fpirs=FPIRS
) -> dict:
    """Each gallery searched by the mixed probes (``identification_metrics``) and their ``mean``, from the 1:1
    template features (``ijb.template_features``) and ``read_1n_protocol``'s files."""
    tid_mid = f"{name}_face_tid_mid.txt"
    probe_path, probe_templates, probe_subjects = protocol["probe"]
    probe_feats = template_subset(template_feats, unique_templates, probe_path, probe_templates, tid_mid)
    galleries = {}
    for key in GALLERIES[name]:
        path, templates, subjects = protocol[key]
        feats = template_subset(template_feats, unique_templates, path, templates, tid_mid)
        galleries[key] = identification_metrics(probe_feats, probe_subjects, feats, subjects, ranks, fpirs)
    return {
        "protocol": "IJB 1:N mixed-media search, InsightFace ijb_evals.py",
        "galleries": galleries,
        "mean": mean_over_galleries(galleries),
    }


def add_identification(result: dict, template_feats, unique_templates, protocol: dict, name: str) -> None:
    """Puts the 1:N numbers into an IJB 1:1 ``result`` (``IJBTarget.run``): ``identification``, the scalars
    ``rank_1`` ... and ``tpir_at_fpir_1e-02`` ... (mean over the galleries), a line of ``summary``."""
    found = evaluate_identification(template_feats, unique_templates, protocol, name)
    mean = found["mean"]
    ranks = {key: value for key, value in mean.items() if key.startswith("rank_")}
    tpirs = {key: value for key, value in mean["tpir_at_fpir"].items() if value is not None}
    result["identification"] = found
    result["scalars"].update({**ranks, **{f"tpir_at_fpir_{key}": value for key, value in tpirs.items()}})
    line = f"{name} 1:N: " + ", ".join(f"{key.replace('_', '-').capitalize()} {v:.4f}" for key, v in ranks.items())
    line += "".join(f", TPIR@FPIR {key} {value:.4f}" for key, value in tpirs.items())
    result["summary"] += "\n" + line
    log.info("%s", line)
