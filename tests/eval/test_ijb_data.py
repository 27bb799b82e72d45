"""IJB-B/C end to end on a small release the tests write: the numbers equal an independent computation
(InsightFace's own ``norm_crop`` alignment, the script's loops); features are cached and reused across flags;
bad meta files and images give one line naming the file and line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from marginlab.errors import DataError
from marginlab.eval import ijb_data
from marginlab.eval.ijb import IJBTarget

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface's norm_crop: skimage's estimate()


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(3 * 14 * 14, 8)).eval()


def reference(ijb, model, flip=True, norm_score=True, detector_score=True) -> np.ndarray:
    """Pair scores the way eval_ijbc.py computes them, aligned by insightface.utils.face_align.norm_crop."""
    from insightface.utils.face_align import norm_crop

    crops = np.stack([norm_crop(img, lmk.astype(np.float32)) for img, lmk in zip(ijb.images, ijb.landmarks)])
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        feats = (model(x) + (model(x.flip(-1)) if flip else 0)).double().numpy()
    if not norm_score:
        feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    if detector_score:
        feats = feats * ijb.faceness[:, None]
    templates = {}
    for t in np.unique(ijb.templates):
        medias = [
            feats[(ijb.templates == t) & (ijb.medias == m)].mean(0) for m in np.unique(ijb.medias[ijb.templates == t])
        ]
        total = np.sum(medias, axis=0)
        templates[t] = total / np.linalg.norm(total)
    return np.array([templates[a] @ templates[b] for a, b, _ in ijb.pairs])


def script_tars(labels, scores, targets):
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [float(tpr[min(list(zip(abs(fpr - t), range(len(fpr)))))[1]]) for t in targets]


@pytest.mark.parametrize(
    "flip,norm_score,detector_score", [(True, True, True), (False, False, True), (True, True, False)]
)
def test_ijb_numbers_equal_an_independent_computation(ijb, tmp_path, flip, norm_score, detector_score):
    model = backbone()
    target = IJBTarget(
        name="ijbc",
        root=str(ijb.root),
        flip=flip,
        norm_score=norm_score,
        detector_score=detector_score,
        batch_size=3,
        num_workers=0,
        far_targets=[0.1, 0.3, 0.5],
        headline_far=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    result = target.run(model, 112, "cpu")
    scores = reference(ijb, model, flip, norm_score, detector_score)
    labels = ijb.pairs[:, 2]
    assert list(result["tar_at_fars"].values()) == script_tars(labels, scores, [0.1, 0.3, 0.5])
    from sklearn.metrics import roc_auc_score

    assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["flags"] == {"flip": flip, "norm_score": norm_score, "detector_score": detector_score}
    assert result["num_images"] == 8 and result["num_templates"] == 4 and result["num_pairs"] == 6
    assert result["scalars"]["tar_at_far_3e-01"] == result["tar_at_far"]


def test_pair_scores_match_the_reference_closely(ijb, tmp_path):
    """The scores themselves (not only the ROC read-outs) agree with the reference to float precision."""
    from marginlab.eval.ijb import pair_scores, template_features

    model = backbone()
    meta = ijb_data.read_meta(ijb.root, "ijbc")
    feats, _ = ijb_data.image_features_cached(meta, model, 112, batch_size=5)
    tmpl, ids = template_features(feats, meta.templates, meta.medias, meta.faceness)
    np.testing.assert_allclose(pair_scores(tmpl, ids, meta.t1, meta.t2), reference(ijb, model), atol=1e-5)


def test_features_are_cached_and_reused_for_other_flags(ijb, tmp_path, monkeypatch):
    model = backbone()
    cache = tmp_path / "cache"
    first = IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0, cache_dir=str(cache)).run(model, 112, "cpu")
    files = sorted(p.name for p in cache.iterdir())
    assert [name.rsplit(".", 1)[1] for name in files] == ["json", "lock", "npy"]  # one key: its features
    assert first["features"].endswith(files[2])

    def fail(*args, **kwargs):
        raise AssertionError("features embedded again")

    monkeypatch.setattr(ijb_data, "extract_features", fail)
    other = IJBTarget(
        name="ijbc", root=str(ijb.root), num_workers=0, cache_dir=str(cache), norm_score=False, detector_score=False
    ).run(model, 112, "cpu")
    assert other["features"] == first["features"] and other["flags"]["norm_score"] is False
    with pytest.raises(AssertionError, match="embedded again"):  # other weights or flip: another key
        IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0, cache_dir=str(cache), flip=False).run(model, 112)
    with torch.no_grad():
        model[2].bias.add_(1.0)
    with pytest.raises(AssertionError, match="embedded again"):
        IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0, cache_dir=str(cache)).run(model, 112)


@pytest.mark.parametrize("damage", ["truncated", "object", "text", "rows", "float64", "nan"])
def test_a_damaged_feature_cache_names_the_file_to_delete(ijb, tmp_path, damage):
    """A truncated or object-dtype cache was a numpy ValueError traceback; one holding NaN failed later, naming a
    template and not the file. One line naming the cache; deleting it embeds again."""
    model, cache = backbone(), tmp_path / "cache"
    target = IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0, cache_dir=str(cache))
    good = target.run(model, 112, "cpu")
    path = cache / good["features"].rsplit("/", 1)[1]
    feats = np.load(path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "object":
        np.save(path, np.array([[1.0, "x"]] * 8, dtype=object), allow_pickle=True)
    elif damage == "text":
        path.write_text("1.0 2.0\n")
    elif damage == "rows":
        np.save(path, feats[:5])
    elif damage == "float64":
        np.save(path, feats.astype(np.float64))
    else:
        feats[6, 3] = np.nan
        np.save(path, feats)
    expected = {
        "truncated": "unreadable IJB feature cache (mmap length is greater than file size)",
        "object": "unreadable IJB feature cache (Array can't be memory-mapped: Python objects in dtype.)",
        "text": "unreadable IJB feature cache (not a .npy file)",
        "rows": "the IJB feature cache holds float32 (5, 8), expected float32 (8, D), one row per image",
        "float64": "the IJB feature cache holds float64 (8, 8), expected float32 (8, D), one row per image",
        "nan": "the IJB feature cache holds NaN/inf (row 6, 7.png)",
    }[damage]
    with pytest.raises(DataError) as err:
        target.run(model, 112, "cpu")
    assert str(err.value) == f"{path}: {expected}; delete the file: the features are recomputed on the next run"
    path.unlink()
    assert target.run(model, 112, "cpu")["tar_at_fars"] == good["tar_at_fars"]


def test_crops_fit_a_112x96_model(ijb):
    meta = ijb_data.read_meta(ijb.root, "ijbc")
    full, narrow = ijb_data.AlignedCrops(meta, 112)[0], ijb_data.AlignedCrops(meta, [112, 96])[0]
    assert narrow.shape == (3, 112, 96) and torch.equal(narrow, full[:, :, 8:104])  # SphereFace's crop inside


# ---- bad input: one line naming the file and line ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["face_tid_mid", "name_5pts_score", "template_pair_label"])
def test_missing_meta_file(ijb, kind):
    (ijb.root / "meta" / f"ijbc_{kind}.txt").unlink()
    with pytest.raises(DataError, match=rf"meta/ijbc_{kind}.txt: IJB meta file not found"):
        ijb_data.read_meta(ijb.root, "ijbc")


def test_pair_naming_an_unknown_template(ijb):
    path = ijb.root / "meta" / "ijbc_template_pair_label.txt"
    path.write_text(path.read_text() + "\n2 99 0\n")
    with pytest.raises(DataError, match=r"ijbc_template_pair_label.txt, line 8: template 99 is not in"):
        ijb_data.read_meta(ijb.root, "ijbc")


@pytest.mark.parametrize(
    "text,message",
    [
        ("1 2\n", "line 1: expected 3 fields"),
        ("1 2 1\n1 x 0\n", "line 2: template ids and label must be integers"),
        ("1 2 1\n1 3 2\n", "line 2: label 2 is not allowed"),
    ],
)
def test_bad_pair_lines(ijb, text, message):
    (ijb.root / "meta" / "ijbc_template_pair_label.txt").write_text(text)
    with pytest.raises(DataError, match=message):
        ijb_data.read_meta(ijb.root, "ijbc")


@pytest.mark.parametrize("label,genuine,impostor", [(1, 6, 0), (0, 0, 6)])
def test_pairs_of_one_kind_are_refused_before_embedding(ijb, label, genuine, impostor):
    path = ijb.root / "meta" / "ijbc_template_pair_label.txt"
    path.write_text("".join(f"{a} {b} {label}\n" for a, b, _ in ijb.pairs))
    with pytest.raises(DataError, match=rf"pair_label.txt: {genuine} genuine \(label 1\) and {impostor} impostor"):
        ijb_data.read_meta(ijb.root, "ijbc")


def test_landmark_line_with_the_wrong_field_count(ijb):
    path = ijb.root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:-2])  # a landmark number and the score missing
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ijbc_name_5pts_score.txt, line 3: expected 12 fields .* got 10"):
        ijb_data.read_meta(ijb.root, "ijbc")


def test_landmarks_beyond_float32_are_refused_when_read(ijb):
    path = ijb.root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[5] = " ".join([lines[5].split()[0], "1e39", *lines[5].split()[2:]])  # inf once in float32
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"ijbc_name_5pts_score.txt, line 6: the numbers must be finite"):
        ijb_data.read_meta(ijb.root, "ijbc")


@pytest.mark.parametrize("workers", [0, 1])
def test_landmarks_off_the_image_are_refused(ijb, workers):
    """Landmarks off every photo gave all-black crops, one feature for all, and AUC 0.5 with no error."""
    path = ijb.root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[3] = " ".join([lines[3].split()[0], *(["1e30"] * 10), lines[3].split()[-1]])
    path.write_text("\n".join(lines) + "\n")
    target = IJBTarget(name="ijbc", root=str(ijb.root), num_workers=workers, batch_size=2)
    with pytest.raises(
        DataError, match=r"^\S*ijbc_name_5pts_score.txt, line 4: landmark 1 \(x=1e\+30, y=1e\+30\) is off"
    ):
        target.run(backbone(), 112, "cpu")


def test_meta_files_listing_other_images(ijb):
    path = ijb.root / "meta" / "ijbc_face_tid_mid.txt"
    path.write_text(path.read_text().replace("4.png", "40.png"))
    with pytest.raises(DataError, match=r"ijbc_name_5pts_score.txt, line 4: image '4.png', but"):
        ijb_data.read_meta(ijb.root, "ijbc")


@pytest.mark.parametrize("damage,workers", [("garbage", 0), ("missing", 0), ("garbage", 1)])
def test_unreadable_image(ijb, tmp_path, damage, workers):
    image = ijb.root / "loose_crop" / "5.png"
    if damage == "garbage":
        image.write_bytes(b"not an image")
    else:
        image.unlink()
    target = IJBTarget(name="ijbc", root=str(ijb.root), num_workers=workers, batch_size=2)
    with pytest.raises(
        DataError,
        match=r"^\S*ijbc_name_5pts_score.txt, line 5: cannot read image \S*5.png "
        r"\((not a readable image|no such file)\)$",
    ):
        target.run(backbone(), 112, "cpu")


def test_run_verifiers_reports_ijb_scalars_and_draws_its_roc(ijb, tmp_path):
    """The trainer's path (``verification=[lfw,ijbc]``): IJB's own scalars, no accuracy keys, its ROC figure."""
    from marginlab.eval.during_training import run_verifiers

    target = IJBTarget(name="ijbc", root=str(ijb.root), num_workers=0)
    scalars, results = run_verifiers({"ijbc": target}, backbone(), 112, "cpu", figures_dir=tmp_path, epoch=3)
    assert {"ijbc/tar_at_far", "ijbc/auc", "ijbc/eer", "ijbc/tar_at_far_1e-06", "ijbc/tar_at_far_1e-01"} <= set(scalars)
    assert not any(key.endswith("/acc") for key in scalars)
    assert scalars["ijbc/tar_at_far"] == results["ijbc"]["tar_at_fars"]["1e-04"]
    assert (tmp_path / "roc_ijbc.png").stat().st_size > 0
