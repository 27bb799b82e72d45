"""IJB 1:N search: identification_metrics against a hand-computed example and a loop-by-loop restatement of
InsightFace's ijb_evals.py ``evaluation_1N`` / ``run_model_test_1N``; the 1:N csv reader's errors; the opt-in
``identification`` option of IJBTarget end to end on the tests' small IJB release."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.errors import ConfigError, DataError
from marginlab.eval import ijb_data
from marginlab.eval.ijb import IJBTarget, template_features
from marginlab.eval.ijb_identification import identification_metrics, mean_over_galleries, read_1n_templates

from .conftest import write_ijb, write_ijb_1n

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# gallery: one unit axis per subject, so a probe's scores are its own coordinates
GALLERY = np.eye(3)
GALLERY_SUBJECTS = [10, 20, 30]
PROBES = np.array(
    [
        [0.9, 0.1, 0.0],  # 10: mate 0.9, rank 1
        [0.5, 0.4, 0.1],  # 20: mate 0.4, rank 2
        [0.6, 0.5, 0.3],  # 30: mate 0.3, rank 3
        [0.7, 0.2, 0.1],  # 10: mate 0.7, rank 1
        [0.65, 0.65, 0.0],  # 20: mate 0.65 tied with subject 10: rank 1, but not strictly first
        [0.2, 0.8, 0.1],  # 99: non-mated, top 0.8
        [0.3, 0.1, 0.6],  # 98: non-mated, top 0.6
        [0.1, 0.2, 0.5],  # 97: non-mated, top 0.5
    ]
)
PROBE_SUBJECTS = [10, 20, 30, 10, 20, 99, 98, 97]


@pytest.mark.parametrize("block", [2, 4096])
def test_hand_computed_ranks_and_tpir(block):
    got = identification_metrics(
        PROBES, PROBE_SUBJECTS, GALLERY, GALLERY_SUBJECTS, (1, 2, 3), (0.01, 0.34, 0.67), block
    )
    assert (got["rank_1"], got["rank_2"], got["rank_3"]) == (3 / 5, 4 / 5, 1.0)
    assert got["rank_hits"] == {"rank_1": 3, "rank_2": 4, "rank_3": 5}
    # non-mated top scores high to low 0.8, 0.6, 0.5: FPIR 0.01 and 0.34 -> int(3 f) - 1 <= 0 -> 0.8; 0.67 -> 0.6
    assert got["thresholds"] == {"1e-02": 0.8, "3e-01": 0.8, "7e-01": 0.6}
    # above 0.8 and strictly first: the 0.9 probe; above 0.6: 0.9 and 0.7 (0.65 ties with another subject)
    assert got["tpir_at_fpir"] == {"1e-02": 1 / 5, "3e-01": 1 / 5, "7e-01": 2 / 5}
    assert (got["num_mated"], got["num_nonmated"], got["num_gallery"]) == (5, 3, 3)


def test_closed_set_has_ranks_but_no_tpir():
    got = identification_metrics(PROBES[:5], PROBE_SUBJECTS[:5], GALLERY, GALLERY_SUBJECTS, (1,), (0.1,))
    assert got["rank_1"] == 3 / 5 and got["tpir_at_fpir"] == {"1e-01": None}


def script_search(query_feats, gallery_feats, query_ids, reg_ids, fars, ks=(1, 5, 10)):
    """ijb_evals.py evaluation_1N's steps as plain loops: (top-k counts, thresholds, recalls, mated count)."""
    reg_ids = np.asarray(reg_ids)
    sim = query_feats @ gallery_feats.T
    counts = dict.fromkeys(ks, 0)
    pos, best_neg, nonmated_top = [], [], []
    for i, qid in enumerate(query_ids):
        if qid not in reg_ids:
            nonmated_top.append(max(sim[i]))
            continue
        label = int(np.flatnonzero(reg_ids == qid)[0])
        descending = list(np.argsort(sim[i])[::-1])
        for k in ks:
            counts[k] += label in descending[:k]
        pos.append(sim[i, label])
        # (the script's max over no non-mate fails on a 1-template gallery: here the lone mate is first)
        best_neg.append(max((s for j, s in enumerate(sim[i]) if reg_ids[j] != qid), default=-np.inf))
    nonmated_top = sorted(nonmated_top, reverse=True)
    thresholds, recalls = [], []
    for far in fars:
        th = nonmated_top[max(int(len(nonmated_top) * far) - 1, 0)]
        thresholds.append(th)
        recalls.append(sum(p > n and p > th for p, n in zip(pos, best_neg)) / len(pos))
    return counts, thresholds, recalls, len(pos)


def random_search(seed, probes=60, per_gallery=12, dim=6):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    subjects = rng.permutation(1000)[: 2 * per_gallery]
    galleries = {"G1": subjects[:per_gallery], "G2": subjects[per_gallery:]}
    probe_subjects = rng.choice(subjects, probes)  # each probe mated in exactly one gallery
    centres = dict(zip(subjects, unit(rng.normal(size=(len(subjects), dim)))))
    probe_feats = unit(np.stack([centres[s] for s in probe_subjects]) + rng.normal(0, 0.6, (probes, dim)))
    gallery_feats = {
        g: unit(np.stack([centres[s] for s in ids]) + rng.normal(0, 0.3, (per_gallery, dim)))
        for g, ids in galleries.items()
    }
    return probe_feats, probe_subjects, gallery_feats, galleries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_script_loops_per_gallery_and_mean(seed):
    probe_feats, probe_subjects, gallery_feats, galleries = random_search(seed)
    fars = (0.01, 0.05, 0.1, 0.3)
    per_gallery = {}
    for g in galleries:
        got = identification_metrics(probe_feats, probe_subjects, gallery_feats[g], galleries[g], fpirs=fars, block=7)
        counts, thresholds, recalls, mated = script_search(
            probe_feats, gallery_feats[g], probe_subjects, galleries[g], fars
        )
        assert got["num_mated"] == mated and 0 < mated < len(probe_subjects)
        assert got["rank_hits"] == {f"rank_{k}": counts[k] for k in (1, 5, 10)}
        assert [got["rank_1"], got["rank_5"], got["rank_10"]] == [counts[k] / mated for k in (1, 5, 10)]
        assert list(got["thresholds"].values()) == thresholds
        assert list(got["tpir_at_fpir"].values()) == recalls
        per_gallery[g] = (got, counts, recalls)
    assert 0 < per_gallery["G1"][0]["tpir_at_fpir"]["1e-01"] < 1  # the example is not degenerate
    mean = mean_over_galleries({g: v[0] for g, v in per_gallery.items()})
    # run_model_test_1N: (g1_top_k_count + g2_top_k_count) / query_num; mean_tpirs = (g1_recalls + g2_recalls) / 2
    for k in (1, 5, 10):
        assert mean[f"rank_{k}"] == (per_gallery["G1"][1][k] + per_gallery["G2"][1][k]) / len(probe_subjects)
    want = (np.array(per_gallery["G1"][2]) + np.array(per_gallery["G2"][2])) / 2
    assert list(mean["tpir_at_fpir"].values()) == pytest.approx(want.tolist(), abs=0)


def test_bad_gallery_and_probes_are_one_line():
    with pytest.raises(DataError, match="gallery subject 20 has several templates"):
        identification_metrics(PROBES, PROBE_SUBJECTS, GALLERY, [10, 20, 20])
    with pytest.raises(DataError, match="no probe's subject is in the gallery"):
        identification_metrics(PROBES, [1] * 8, GALLERY, GALLERY_SUBJECTS)
    with pytest.raises(DataError, match="must agree"):
        identification_metrics(PROBES, PROBE_SUBJECTS[:3], GALLERY, GALLERY_SUBJECTS)


# ---- the 1:N csv reader ------------------------------------------------------------------------------------------
def test_read_1n_templates(tmp_path):
    path = tmp_path / "ijbc_1N_probe_mixed.csv"
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n7,3,a.jpg\n2,5,b.jpg\n\n7,3,frames/1.png\n")
    templates, subjects = read_1n_templates(path)
    assert templates.tolist() == [2, 7] and subjects.tolist() == [5, 3]


@pytest.mark.parametrize(
    "text,message",
    [
        ("SUBJECT_ID,TEMPLATE_ID,FILENAME\n1,2,a.jpg\n", r"line 1: header starts \['SUBJECT_ID', 'TEMPLATE_ID'\]"),
        ("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,2,a.jpg\nx,2,b.jpg\n", r"line 3: TEMPLATE_ID and SUBJECT_ID must be"),
        ("TEMPLATE_ID,SUBJECT_ID,FILENAME\n1\n", r"line 2: TEMPLATE_ID and SUBJECT_ID must be integers, got \['1'\]"),
        ("TEMPLATE_ID,SUBJECT_ID,FILENAME\n", r"no template rows"),
        ("TEMPLATE_ID,SUBJECT_ID\n4,1,a\n4,2,b\n", r"template 4 has rows of subjects \[1, 2\]"),
    ],
)
def test_read_1n_templates_bad_rows(tmp_path, text, message):
    path = tmp_path / "g.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_1n_templates(path)


# ---- IJBTarget(identification=true) end to end -------------------------------------------------------------------
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, 8)).eval()


@pytest.mark.parametrize("name", ["ijbc", "ijbb"])
def test_ijb_target_adds_the_search_numbers(tmp_path, face, name):
    root = tmp_path / name.upper()
    write_ijb(root, face.photo, name)
    write_ijb_1n(root, name)
    model = backbone()
    plain = IJBTarget(name=name, root=str(root), num_workers=0, cache_dir=str(tmp_path / "cache")).run(model, 112)
    result = IJBTarget(
        name=name, root=str(root), num_workers=0, cache_dir=str(tmp_path / "cache"), identification=True
    ).run(model, 112)
    assert "identification" not in plain
    assert result["tar_at_fars"] == plain["tar_at_fars"] and result["auc"] == plain["auc"]  # 1:1 untouched

    meta = ijb_data.read_meta(root, name)
    feats, _ = ijb_data.image_features_cached(meta, model, 112, cache_dir=str(tmp_path / "cache"))
    tmpl, ids = template_features(feats, meta.templates, meta.medias, meta.faceness)
    row = {int(t): r for r, t in enumerate(ids)}
    probes = np.stack([tmpl[row[2]], tmpl[row[4]]])  # conftest SEARCH: probes 2 (subject 101), 4 (102)
    galleries = ("G1", "G2") if name == "ijbc" else ("S1", "S2")
    counts, recalls = {}, {}
    for g, t, s in zip(galleries, (1, 3), (101, 102)):
        counts[g], _, recalls[g], _ = script_search(probes, tmpl[[row[t]]], [101, 102], [s], (0.01, 0.1))
        assert result["identification"]["galleries"][g]["tpir_at_fpir"] == dict(zip(["1e-02", "1e-01"], recalls[g]))
    want_tpir = (np.array(recalls[galleries[0]]) + recalls[galleries[1]]) / 2
    assert result["scalars"]["rank_1"] == (counts[galleries[0]][1] + counts[galleries[1]][1]) / 2 == 1.0
    assert [result["scalars"]["tpir_at_fpir_1e-02"], result["scalars"]["tpir_at_fpir_1e-01"]] == want_tpir.tolist()
    assert result["summary"].splitlines()[0] == plain["summary"]
    assert result["summary"].splitlines()[1].startswith(f"{name} 1:N: Rank-1 1.0000, Rank-5 1.0000, Rank-10 1.0000")


def test_missing_1n_file_is_named_before_embedding(ijb, monkeypatch):
    write_ijb_1n(ijb.root, "ijbc")
    (ijb.root / "meta" / "ijbc_1N_gallery_G2.csv").unlink()

    def fail(*args, **kwargs):
        raise AssertionError("embedded before the 1:N files were checked")

    monkeypatch.setattr(ijb_data, "extract_features", fail)
    with pytest.raises(DataError, match=r"meta/ijbc_1N_gallery_G2.csv: IJB 1:N file not found"):
        IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0, identification=True).run(backbone(), 112)
    with pytest.raises(ConfigError, match="identification='yes' is not allowed"):
        IJBTarget(name="ijbc", root=str(ijb.root), identification="yes")


def test_probe_template_without_images_is_named(ijb):
    write_ijb_1n(ijb.root, "ijbc")
    path = ijb.root / "meta" / "ijbc_1N_probe_mixed.csv"
    path.write_text(path.read_text() + "99,102,missing.png,0\n")
    with pytest.raises(DataError, match=r"ijbc_1N_probe_mixed.csv: template 99 has no image in ijbc_face_tid_mid"):
        IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0, identification=True).run(backbone(), 112)


def test_eval_command_reports_the_search(ijb, capsys, face_checkpoint):
    import json

    from marginlab.commands.cli import main

    write_ijb_1n(ijb.root, "ijbc")
    ckpt = face_checkpoint("last.pt", embedding_dim=16, width=4, epoch=1)
    args = ["eval", f"checkpoint={ckpt}", "verification=[ijbc]", f"verification.ijbc.root={ijb.root}", "device=cpu"]
    assert main([*args, "verification.ijbc.num_workers=0", "verification.ijbc.identification=true"]) == 0
    assert "ijbc 1:N: Rank-1 1.0000, Rank-5 1.0000, Rank-10 1.0000, TPIR@FPIR 1e-02 " in capsys.readouterr().out
    written = [json.loads(p.read_text()) for p in ckpt.parent.rglob("*.json")]
    assert any("tpir_at_fpir_1e-01" in json.dumps(data) and '"G2"' in json.dumps(data) for data in written)
