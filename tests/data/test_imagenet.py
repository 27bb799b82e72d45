"""ImageNet read through torchvision's ImageFolder / ImageNet from a tiny tree of real JPEGs (and archives)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.datasets.imagenet as tv_imagenet
from PIL import Image

from marginlab.data.imagenet import ImageNetData
from marginlab.errors import ConfigError, DataError

WNIDS = ("n01440764", "n01443537", "n01484850")
PER_CLASS = 2


def jpeg_bytes(rng: np.random.Generator, size=(48, 40)) -> bytes:
    """A real JPEG of random RGB noise (width x height = size)."""
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_tree(root: Path, splits=("train", "val"), wnids=WNIDS) -> None:
    """<root>/<split>/<wnid>/<wnid>_<i>.JPEG, the layout ImageFolder reads."""
    rng = np.random.default_rng(0)
    for split in splits:
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(PER_CLASS):
                (root / split / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(rng))


def add_to_tar(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_archives(root: Path) -> list[int]:
    """The three official archives in miniature, in the layouts torchvision's ImageNet unpacks:
    ILSVRC2012_img_train.tar holds one <wnid>.tar per class; ILSVRC2012_img_val.tar holds flat
    ILSVRC2012_val_*.JPEG files; the devkit holds data/meta.mat (the synsets struct array) and
    data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC2012_ID per val image, in file order).
    Returns the val labels (0-based index into the sorted wnids)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as train:
        for wnid in WNIDS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_class:
                for i in range(PER_CLASS):
                    add_to_tar(per_class, f"{wnid}_{i}.JPEG", jpeg_bytes(rng))
            add_to_tar(train, f"{wnid}.tar", inner.getvalue())
    val_labels = [2, 0, 1, 0, 2]
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(len(val_labels)):
            add_to_tar(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(rng))
    fields = [
        "ILSVRC2012_ID",
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    synsets = np.array(
        [(k + 1, wnid, f"class {k}, alias", "", 0, np.zeros(0), 0, PER_CLASS) for k, wnid in enumerate(WNIDS)],
        dtype=[(f, "O") for f in fields],
    )
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{label + 1}\n" for label in val_labels).encode()  # ILSVRC2012_IDs are 1-based
    with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as devkit:
        add_to_tar(devkit, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        add_to_tar(devkit, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
    return val_labels


def register_md5s(monkeypatch, root: Path) -> None:
    """torchvision checks each archive against the official md5, which generated archives cannot match.
    The test (only) registers the generated archives' md5s instead, so the real check still runs."""
    meta = {
        key: (name, hashlib.md5((root / name).read_bytes()).hexdigest())
        for key, (name, _) in tv_imagenet.ARCHIVE_META.items()
    }
    monkeypatch.setattr(tv_imagenet, "ARCHIVE_META", meta)


def small(root: Path, **kwargs) -> ImageNetData:
    """Two images a class: too few to hold out 1% (tests/data/test_val_split.py holds out a validation split)."""
    return ImageNetData(
        root=str(root),
        image_size=kwargs.pop("image_size", 32),
        batch_size=4,
        num_workers=0,
        val_fraction=kwargs.pop("val_fraction", 0),
        **kwargs,
    )


def test_folder_tree_gives_classes_shapes_and_labels(tmp_path):
    write_tree(tmp_path)
    data = small(tmp_path)
    assert data.num_classes == 3  # counted from train/, setting the data up on first use
    assert (data.in_channels, data.image_size) == (3, 32)
    assert len(data.train_set) == len(data.test_set) == 3 * PER_CLASS  # val/ is the test split
    assert data.test_set.classes == sorted(WNIDS)
    x, y = next(iter(data.train_loader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 3
    xv, yv = next(iter(data.test_loader()))
    assert xv.shape == (4, 3, 32, 32) and yv.tolist() == [0, 0, 1, 1]


def test_default_transforms_give_224_crops(tmp_path):
    data = ImageNetData(root=str(tmp_path))
    assert data.image_size == 224
    image = Image.fromarray(np.zeros((40, 48, 3), dtype=np.uint8))
    assert data.transform(train=True)(image).shape == (3, 224, 224)
    assert data.transform(train=False)(image).shape == (3, 224, 224)
    resize = data.transform(train=False).transforms[0]
    assert resize.size == 256
    assert small(tmp_path, image_size=112).transform(train=False).transforms[0].size == 128


def test_archives_are_unpacked_by_torchvision(tmp_path, monkeypatch):
    val_labels = write_archives(tmp_path)
    register_md5s(monkeypatch, tmp_path)
    data = small(tmp_path)
    data.setup()
    assert data.num_classes == 3
    assert len(data.train_set) == 3 * PER_CLASS
    assert [label for _, label in data.test_set.samples] == sorted(val_labels)  # samples are grouped by wnid
    assert sorted(Path(path).name for path, label in data.test_set.samples if label == 0) == [
        f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i, label in enumerate(val_labels) if label == 0
    ]
    x, _ = data.test_set[0]
    assert x.shape == (3, 32, 32)


def test_corrupt_archive_is_named(tmp_path, monkeypatch):
    write_archives(tmp_path)
    register_md5s(monkeypatch, tmp_path)
    val_tar = tmp_path / "ILSVRC2012_img_val.tar"
    val_tar.write_bytes(val_tar.read_bytes()[:-512])
    with pytest.raises(DataError, match="ILSVRC2012_img_val.tar"):
        small(tmp_path).setup()


@pytest.mark.parametrize("download", [False, True])
def test_absent_data_says_where_and_how(tmp_path, download):
    with pytest.raises(DataError) as info:
        small(tmp_path / "imagenet", download=download).setup()
    message = str(info.value)
    assert str(tmp_path / "imagenet") in message
    assert "cannot be downloaded automatically" in message
    assert all(
        name in message
        for name in (
            "ILSVRC2012_img_train.tar",
            "ILSVRC2012_img_val.tar",
            "ILSVRC2012_devkit_t12.tar.gz",
            "MARGINLAB_DATA_DIR",
        )
    )
    assert ("dataset.download=true cannot fetch it" in message) == download


def test_root_that_is_a_file_is_a_config_error(tmp_path):
    a_file = tmp_path / "imagenet"
    a_file.write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        small(a_file).setup()


def test_class_folder_without_images_is_named(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train" / "n09999999").mkdir()
    with pytest.raises(DataError, match=f"train folder {tmp_path / 'train'} is unusable"):
        small(tmp_path).setup()


def test_train_and_val_classes_must_match(tmp_path):
    write_tree(tmp_path, splits=("train",))
    write_tree(tmp_path, splits=("val",), wnids=WNIDS[:2])
    with pytest.raises(DataError, match=r"different class folders \(3 vs 2"):
        small(tmp_path).setup()


def test_corrupt_image_is_named(tmp_path):
    write_tree(tmp_path)
    bad = tmp_path / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    data = small(tmp_path)
    data.setup()
    with pytest.raises(DataError, match=f"image {bad} is unreadable"):
        data.test_set[0]
