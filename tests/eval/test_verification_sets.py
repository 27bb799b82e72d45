"""Verification sets: InsightFace .bin pickles and raw LFW (folder + pairs.txt), written here in the real
formats and read back; bad files give DataErrors naming the file and the image or line."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import marginlab.config  # noqa: F401  (the data_root resolver)
from marginlab.errors import DataError
from marginlab.eval.verification_sets import VerificationTarget, load_bin, load_lfw_folder, load_verification_set

CONFIGS = Path(__file__).resolve().parents[2] / "marginlab" / "configs" / "verification"


@pytest.fixture
def bin_set(tmp_path, face):
    """A 10-pair .bin in the Python 2 pickle format of InsightFace's releases (PNG bytes: exact pixels)."""
    images = [face.image(i) for i in range(20)]
    issame = [i % 2 == 0 for i in range(10)]
    path = tmp_path / "lfw.bin"
    path.write_bytes(face.py2_bin_pickle([face.encode(im) for im in images], issame))
    return path, images, issame


def test_load_bin_py2_pickle(bin_set, face):
    path, images, issame = bin_set
    data = load_bin(path, image_size=112)
    assert data.name == "lfw" and len(data) == 10 and data.folds == 10
    assert data.images.shape == (20, 3, 112, 112) and data.images.dtype == torch.uint8
    assert data.issame.tolist() == issame
    assert torch.equal(data.images, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    np.testing.assert_allclose(data.float_images().numpy(), np.stack([face.normalized(im) for im in images]), atol=1e-6)


def test_load_bin_py3_pickle_and_sizes(tmp_path, face):
    images = [face.image(i) for i in range(4)]
    path = tmp_path / "cfp_fp.bin"
    for protocol in (2, 4):  # protocol 2 in Python 3 writes bytes through _codecs.encode
        with open(path, "wb") as f:
            pickle.dump(([face.encode(im) for im in images], [True, False]), f, protocol=protocol)
        data = load_bin(path, image_size=[112, 96])
        assert data.name == "cfp_fp" and data.images.shape == (4, 3, 112, 96)
        assert torch.equal(data.images[1], torch.from_numpy(images[1][:, 8:104]).permute(2, 0, 1))
    assert load_bin(path, image_size=56).images.shape == (4, 3, 56, 56)


def test_bin_corrupt_image_named(tmp_path, face):
    blobs = [face.encode(face.image(i)) for i in range(4)]
    blobs[3] = blobs[3][:40]  # truncated PNG
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(face.py2_bin_pickle(blobs, [True, False]))
    with pytest.raises(DataError, match=r"agedb_30\.bin: image 3 \(pair 1\): cannot decode the image"):
        load_bin(path)


def test_bin_structure_errors(tmp_path, face):
    path = tmp_path / "x.bin"
    path.write_bytes(face.py2_bin_pickle([face.encode(face.image(0))] * 3, [True, False]))
    with pytest.raises(DataError, match=r"x\.bin: 3 images for 2 pairs"):
        load_bin(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"x\.bin: not a readable verification \.bin"):
        load_bin(path)
    path.write_bytes(pickle.dumps(print))  # a global other than numpy's array helpers is refused
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_bin(path)
    with pytest.raises(DataError, match="not found"):
        load_bin(tmp_path / "missing.bin")


def test_raw_lfw_folder(tmp_path, face):
    pairs, images, issame = face.write_lfw(tmp_path / "lfw", folds=2, per=2)
    data = load_lfw_folder(tmp_path / "lfw", image_size=112)
    assert data.folds == 2 and data.issame.tolist() == issame == [True, True, False, False] * 2
    assert torch.equal(data.images, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    same_dir = load_verification_set(tmp_path / "lfw", image_size=[112, 96], pairs=pairs)
    assert same_dir.name == "lfw" and same_dir.images.shape == (16, 3, 112, 96)


def edit_line(pairs: Path, n: int, text: str) -> None:
    lines = pairs.read_text().splitlines()
    lines[n - 1] = text
    pairs.write_text("\n".join(lines) + "\n")


def test_pairs_errors_name_file_and_line(tmp_path, face):
    pairs, _, _ = face.write_lfw(tmp_path / "lfw", folds=2, per=2)
    original = pairs.read_text()
    edit_line(pairs, 3, "Person_0_1\t1\t7")  # matched line naming a missing image
    with pytest.raises(DataError, match=r"pairs\.txt, line 3: image .*Person_0_1_0007\.jpg does not exist"):
        load_lfw_folder(tmp_path / "lfw")
    pairs.write_text(original)
    edit_line(pairs, 4, "Other_0_0_a\t1\tOther_0_0_b")  # a mismatched line with 3 fields
    with pytest.raises(DataError, match=r"pairs\.txt, line 4: expected 4 fields \(mismatched"):
        load_lfw_folder(tmp_path / "lfw")
    pairs.write_text(original)
    edit_line(pairs, 2, "Person_0_0\t1\tone")
    with pytest.raises(DataError, match=r"pairs\.txt, line 2: image number 'one' is not an integer"):
        load_lfw_folder(tmp_path / "lfw")
    pairs.write_text(original)
    edit_line(pairs, 1, "ten 300")
    with pytest.raises(DataError, match=r"pairs\.txt, line 1: expected a header"):
        load_lfw_folder(tmp_path / "lfw")
    pairs.write_text(original.replace("2\t2", "3\t2", 1))
    with pytest.raises(DataError, match=r"pairs\.txt: the header promises 3 folds .* = 12 pair lines, found 8"):
        load_lfw_folder(tmp_path / "lfw")


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3 * 112 * 112, 16)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_config_builds_a_target_that_runs(bin_set):
    path, _, issame = bin_set
    for name in ("lfw", "cfp_fp", "agedb_30"):
        text = (CONFIGS / f"{name}.yaml").read_text()
        assert text.startswith(f"# @package verification.{name}\n")  # verification=[lfw,cfp_fp] keeps both
        cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
        raw = OmegaConf.to_container(cfg, resolve=False)
        assert raw["name"] == name and raw["path"] == f"${{data_root:faces_webface_112x112/{name}.bin}}"
        assert raw["flip"] is True and raw["batch_size"] == 256
    cfg.path = str(path)
    target = instantiate(cfg)
    assert isinstance(target, VerificationTarget) and target.name == "agedb_30"
    result = target.run(Flat(), image_size=112)
    assert result["name"] == "agedb_30" and result["num_pairs"] == len(issame) == 10
    assert {"accuracy", "accuracy_std", "threshold", "tar_at_far", "far", "auc", "eer", "tpr", "fpr"} <= set(result)
    assert target.load(112) is target.load(112)  # cached per image size
    target.nfolds = 2
    assert target.run(Flat(), image_size=112)["nfolds"] == 2


# ---------------------------------------------------------------- the other .bin sets and verification=[pairs]
BIN_SETS = ("calfw", "cplfw", "cfp_ff", "vgg2_fp")


def verifiers(*overrides: str) -> dict:
    with initialize_config_module("marginlab.configs", version_base="1.3"):
        cfg = compose("eval", overrides=["checkpoint=unused", *overrides])
    return {name: instantiate(node) for name, node in cfg.verification.items()}


def test_the_other_bin_sets_are_configs_on_the_bin_code_path(tmp_path, face):
    images = [face.image(i) for i in range(20)]
    issame = [i % 3 == 0 for i in range(10)]
    bins = tmp_path / "bins"
    bins.mkdir()
    for name in BIN_SETS:
        (bins / f"{name}.bin").write_bytes(face.py2_bin_pickle([face.encode(im) for im in images], issame))
        assert (CONFIGS / f"{name}.yaml").read_text().startswith(f"# @package verification.{name}\n")
    targets = verifiers(
        f"verification=[{','.join(BIN_SETS)}]", *(f"verification.{n}.path={bins / n}.bin" for n in BIN_SETS)
    )
    assert list(targets) == list(BIN_SETS)
    for name, target in targets.items():
        assert target.name == name and target.flip is True and target.path == str(bins / f"{name}.bin")
        data = target.load(112)
        assert data.folds == 10 and data.issame.tolist() == issame
        assert torch.equal(data.images, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    result = targets["vgg2_fp"].run(Flat(), image_size=112)
    assert result["name"] == "vgg2_fp" and result["nfolds"] == 10 and result["num_pairs"] == 10
    default = verifiers("verification=[cplfw]")["cplfw"].path
    assert default.endswith(str(Path("faces_webface_112x112") / "cplfw.bin"))


def write_pairs_set(root: Path, face, lines_of=lambda rows: rows) -> tuple[Path, list[np.ndarray], list[bool]]:
    """Six pairs of PNG crops under ``root`` (in sub-folders, one absolute path) and their pairs file."""
    rows, images, issame = ["# path1 path2 label"], [], []
    for i in range(6):
        a, b = face.image(100 + 2 * i), face.image(101 + 2 * i)
        for j, img in enumerate((a, b)):
            (root / f"id{i}").mkdir(parents=True, exist_ok=True)
            (root / f"id{i}" / f"{j}.png").write_bytes(face.encode(img))
        first = str(root / f"id{i}" / "0.png") if i == 4 else f"id{i}/0.png"
        rows.append(f"{first}\tid{i}/1.png {i % 2}")
        if i == 2:
            rows.append("")
        images += [a, b]
        issame.append(bool(i % 2))
    pairs = root / "my_pairs.txt"
    pairs.write_text("\n".join(lines_of(rows)) + "\n")
    return pairs, images, issame


def test_pairs_set_reads_a_path_pairs_file_and_runs(tmp_path, face):
    pairs, images, issame = write_pairs_set(tmp_path / "mine", face)
    (target,) = verifiers(
        "verification=[pairs]",
        f"verification.pairs.path={tmp_path / 'mine'}",
        f"verification.pairs.pairs={pairs}",
        "verification.pairs.nfolds=2",
    ).values()
    data = target.load(112)
    assert data.name == "pairs" and data.folds == 10 and data.issame.tolist() == issame
    assert torch.equal(data.images, torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2))
    result = target.run(Flat(), image_size=112)
    assert result["nfolds"] == 2 and result["num_pairs"] == 6 and 0.0 <= result["accuracy"] <= 1.0


def test_pairs_set_reads_lfw_pairs_txt_too(tmp_path, face):
    _, _, issame = face.write_lfw(tmp_path / "lfw", folds=2, per=2)
    (target,) = verifiers("verification=[pairs]", f"verification.pairs.path={tmp_path / 'lfw'}").values()
    data = target.load(112)
    assert data.folds == 2 and data.issame.tolist() == issame


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda rows: rows[:3] + ["id2/0.png id2/1.png"] + rows[4:], r"my_pairs\.txt, line 4: expected 3 fields"),
        (
            lambda rows: rows[:2] + ["id1/0.png id1/1.png same"] + rows[3:],
            r"my_pairs\.txt, line 3: label 'same' is not allowed: 1 \(same identity\) or 0",
        ),
        (
            lambda rows: rows[:1] + ["id0/0.png id0/9.png 0"] + rows[2:],
            r"my_pairs\.txt, line 2: image .*id0/9\.png does not exist",
        ),
        (lambda rows: rows[:1], r"my_pairs\.txt: no pair in the pairs file"),
    ],
)
def test_pairs_file_errors_name_file_and_line(tmp_path, face, edit, message):
    pairs, _, _ = write_pairs_set(tmp_path / "mine", face, edit)
    with pytest.raises(DataError, match=message):
        load_lfw_folder(tmp_path / "mine", pairs, name="pairs")
    with pytest.raises(DataError, match=r"missing\.txt: pairs file not found"):
        load_lfw_folder(tmp_path / "mine", tmp_path / "missing.txt", name="pairs")


@pytest.mark.parametrize("label,same,different", [("1", 6, 0), ("0", 0, 6)])
def test_a_pairs_file_of_one_kind_is_refused(tmp_path, face, label, same, different):
    """Only same-identity pairs read TAR@FAR 1.0 (FAR undefined): refused, naming the file and the counts."""
    relabel = lambda rows: rows[:1] + [row[:-1] + label if row else row for row in rows[1:]]  # noqa: E731
    pairs, _, _ = write_pairs_set(tmp_path / "mine", face, relabel)
    expected = (
        rf"^{pairs}: {same} same-identity \(label 1\) and {different} different-identity \(label 0\) pairs; "
        r"verification needs both kinds"
    )
    with pytest.raises(DataError, match=expected):
        load_lfw_folder(tmp_path / "mine", pairs, name="pairs")
    with pytest.raises(DataError, match=expected):  # at start-up with nfolds, before any image is decoded
        VerificationTarget("pairs", str(tmp_path / "mine"), pairs=str(pairs), nfolds=2)
