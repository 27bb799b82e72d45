"""CasiaData over an ImageFolder tree of aligned JPEG crops: labels, sizes, flips, corrupt files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from marginlab.data.face.casia import CasiaData
from marginlab.errors import ConfigError, DataError


@pytest.fixture
def folder(tmp_path, face):
    """3 identities (sorted names give labels 0, 1, 2) x 2 images, JPEG, 112x112."""
    images = {}
    for label, name in enumerate(["id_a", "id_b", "id_c"]):
        (tmp_path / name).mkdir()
        for j in range(2):
            img = face.image(10 * label + j)
            (tmp_path / name / f"{j}.jpg").write_bytes(face.encode(img, "JPEG"))
            images[(label, j)] = img
    return tmp_path, images


def test_folder_labels_and_shapes(folder):
    root, _ = folder
    data = CasiaData(root=str(root), batch_size=6, flip=False)
    assert data.num_classes == 3  # counted from the folders (setup on first use)
    assert data.source == "folder" and len(data.train_set) == 6
    x, y = next(iter(data.train_loader()))
    assert x.shape == (6, 3, 112, 112) and sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    assert x.min() >= -1 and x.max() <= 1
    assert data.val_loader() is None


def test_folder_pixels_and_112x96(folder, face):
    root, images = folder
    data = CasiaData(root=str(root), image_size=[112, 96], flip=False)
    data.setup()
    x, y = data.train_set[2]  # id_b/0.jpg
    assert y.item() == 1 and x.shape == (3, 112, 96)
    assert np.abs(x.numpy() - face.normalized(images[(1, 0)][:, 8:104])).mean() < 0.1


def test_other_sizes_are_resized(folder):
    root, _ = folder
    data = CasiaData(root=str(root), image_size=64, flip=False)
    data.setup()
    assert data.image_size == 64 and data.train_set[0][0].shape == (3, 64, 64)


def test_random_flip_only_when_training(folder):
    root, _ = folder
    data = CasiaData(root=str(root), flip=True, val_fraction=0.5, split_seed=0)
    data.setup()
    torch.manual_seed(0)
    seen = {tuple(data.train_set[0][0][0, 0, :2].tolist()) for _ in range(16)}
    assert len(seen) == 2  # the asymmetric image shows up both ways round
    assert len({tuple(data.val_set[0][0][0, 0, :2].tolist()) for _ in range(8)}) == 1


def test_corrupt_file_named(folder):
    root, _ = folder
    (root / "id_b" / "0.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = CasiaData(root=str(root))
    data.setup()
    with pytest.raises(DataError, match=r"id_b/0\.jpg: cannot decode the image"):
        data.train_set[2]


def test_skip_corrupt_replaces_and_counts(folder, caplog):
    root, _ = folder
    (root / "id_b" / "0.jpg").write_bytes(b"garbage")
    data = CasiaData(root=str(root), skip_corrupt=True, flip=False)
    data.setup()
    with caplog.at_level(logging.WARNING, logger="marginlab.data.face"):
        x, y = data.train_set[2]
    assert torch.equal(x, data.train_set[3][0]) and y.item() == 1
    assert data.train_set.skipped == 1
    assert "id_b/0.jpg" in caplog.text and "1 skipped so far" in caplog.text


def test_empty_folder_tree(tmp_path):
    (tmp_path / "id_a").mkdir()
    (tmp_path / "id_a" / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="not a usable image folder"):
        CasiaData(root=str(tmp_path), format="folder").setup()


@pytest.mark.parametrize(
    "key,value", [("image_size", [112]), ("image_size", 0), ("format", "lmdb"), ("val_fraction", 0.9)]
)
def test_bad_config(key, value, tmp_path):
    with pytest.raises(ConfigError, match=f"dataset.{key}"):
        CasiaData(root=str(tmp_path), **{key: value})


def test_16_bit_grayscale_png_keeps_its_high_byte(tmp_path):
    """A 16-bit grayscale PNG (PIL mode I;16) decodes to v >> 8 in every channel, as OpenCV reads it (align, IJB),
    not clipped to an all-white image."""
    import cv2
    from PIL import Image

    from marginlab.data.face import decode_image
    from marginlab.data.face.imagefolder import FolderIndex

    values = np.linspace(0, 65535, 112 * 112).round().astype(np.uint16).reshape(112, 112)
    (tmp_path / "id_a").mkdir()
    path = tmp_path / "id_a" / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    rgb = np.asarray(decode_image(str(path), "x"))
    assert rgb.shape == (112, 112, 3) and rgb.min() == 0 and rgb.max() == 255
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], values >> 8)
    np.testing.assert_array_equal(rgb, cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    x, _ = FolderIndex(tmp_path).dataset(None, (112, 112), train=False)[0]
    np.testing.assert_allclose(x[0].numpy(), ((values >> 8) / 255 - 0.5) / 0.5, atol=1e-6)


def test_32_bit_integer_pixels_are_refused(tmp_path):
    from PIL import Image

    from marginlab.data.face import decode_image

    path = tmp_path / "deep.tif"
    Image.fromarray(np.full((8, 8), 70000, np.int32), "I").save(path)
    with pytest.raises(DataError, match=r"deep\.tif: 32-bit integer pixels .* give an 8- or 16-bit image$"):
        decode_image(str(path), str(path))
