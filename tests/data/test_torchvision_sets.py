"""MNIST / CIFAR-10 / CIFAR-100 read through torchvision's real classes from files written in the real formats."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.mnist as tv_mnist

from marginlab.data.torchvision_sets import CIFAR10Data, CIFAR100Data, MNISTData
from marginlab.errors import ConfigError, DataError

RNG_SEED = 0


# ---- writers for the on-disk formats torchvision reads ---------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, then each dimension as a big-endian int32."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """The four raw files, un-gzipped, in <root>/MNIST/raw/: torchvision 0.29 only checks that they exist
    (md5s are checked on the downloaded .gz archives, not on these) and reads them with its IDX reader."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(RNG_SEED)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels"] = np.arange(n, dtype=np.uint8) % 10
        write_idx(raw / f"{split}-images-idx3-ubyte", arrays[f"{split}-images"])
        write_idx(raw / f"{split}-labels-idx1-ubyte", arrays[f"{split}-labels"])
    return arrays


def pickle_to(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    """cifar-10-batches-py/: data_batch_1..5 and test_batch ({'data': N x 3072 uint8, 'labels'}), batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(RNG_SEED)
    test_images = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        pickle_to(folder / name, {"data": images, "labels": [i % 10 for i in range(per_batch)]})
        test_images = images
    pickle_to(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return test_images


def write_cifar100(root: Path, n: int = 12) -> np.ndarray:
    """cifar-100-python/: train and test ({'data', 'fine_labels', 'coarse_labels'}) and meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(RNG_SEED)
    for name in ("train", "test"):
        images = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        pickle_to(
            folder / name,
            {
                "data": images,
                "fine_labels": [(7 * i) % 100 for i in range(n)],
                "coarse_labels": [i % 20 for i in range(n)],
            },
        )
    pickle_to(
        folder / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
    )
    return images


def register_md5s(monkeypatch, tv_class, folder: Path) -> None:
    """torchvision checks every CIFAR file against the md5 of the official release, which generated files
    cannot match. The test (only) registers the generated files' own md5s in the class's file lists, so
    torchvision's real integrity check still runs on them - and catches the corruption tests below."""
    md5 = lambda name: hashlib.md5((folder / name).read_bytes()).hexdigest()
    monkeypatch.setattr(tv_class, "train_list", [[name, md5(name)] for name, _ in tv_class.train_list])
    monkeypatch.setattr(tv_class, "test_list", [[name, md5(name)] for name, _ in tv_class.test_list])
    monkeypatch.setattr(tv_class, "meta", {**tv_class.meta, "md5": md5(tv_class.meta["filename"])})


def no_network(*args, **kwargs):
    raise URLError("[Errno -2] Name or service not known")


# CIFAR-10 and CIFAR-100 side by side: (our class, torchvision's class, writer, per-file layout)
CIFAR = {
    "cifar10": (CIFAR10Data, tv_cifar.CIFAR10, write_cifar10, "cifar-10-batches-py", "data_batch_3"),
    "cifar100": (CIFAR100Data, tv_cifar.CIFAR100, write_cifar100, "cifar-100-python", "train"),
}


@pytest.fixture(params=sorted(CIFAR))
def cifar(request, tmp_path, monkeypatch):
    """A generated CIFAR-10 or -100 under tmp_path with its md5s registered: (class, root, test images)."""
    data_cls, tv_class, write, folder, _ = CIFAR[request.param]
    test_images = write(tmp_path)
    register_md5s(monkeypatch, tv_class, tmp_path / folder)
    return request.param, data_cls, test_images


def normalized(images_hwc: np.ndarray, mean, std) -> torch.Tensor:
    """What ToTensor + Normalize make of uint8 H x W x C images: (x / 255 - mean) / std, channels first."""
    x = torch.from_numpy(images_hwc).float().div(255).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# ---- MNIST ------------------------------------------------------------------------------------------------
def test_mnist_reads_idx_files(tmp_path):
    arrays = write_mnist(tmp_path)
    data = MNISTData(root=str(tmp_path), download=False, batch_size=8, num_workers=0, val_fraction=0)
    data.setup()
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28)
    assert len(data.train_set) == 20 and len(data.test_set) == 10 and data.val_loader() is None
    x, y = next(iter(data.train_loader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 10
    xv, yv = next(iter(data.test_loader()))  # unshuffled: the file's order
    expected = normalized(arrays["t10k-images"][:8, :, :, None], data.mean, data.std)
    torch.testing.assert_close(xv, expected)
    assert yv.tolist() == arrays["t10k-labels"][:8].tolist()


def test_mnist_absent_without_download_names_the_path(tmp_path):
    data = MNISTData(root=str(tmp_path / "nowhere"), download=False, num_workers=0)
    with pytest.raises(DataError) as info:
        data.setup()
    message = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "dataset.download=true" in message and "MARGINLAB_DATA_DIR" in message
    assert "train-images-idx3-ubyte" in message


def test_mnist_download_without_network_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    data = MNISTData(root=str(tmp_path), download=True, num_workers=0)
    with pytest.raises(DataError) as info:
        data.setup()
    message = str(info.value)
    assert "could not download MNIST" in message and str(tmp_path) in message
    assert "Name or service not known" in message and "\n" not in message


def test_mnist_truncated_file_is_named(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte is unreadable or corrupted"):
        MNISTData(root=str(tmp_path), download=False, num_workers=0).setup()


def test_mnist_has_no_augmentation(tmp_path):
    data = MNISTData(root=str(tmp_path), augment=True)
    assert [type(t).__name__ for t in data.transform(train=True).transforms] == ["ToTensor", "Normalize"]


# ---- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------------------
def test_cifar_reads_pickled_batches(cifar, tmp_path):
    name, data_cls, test_images = cifar
    data = data_cls(root=str(tmp_path), download=False, batch_size=4, eval_batch_size=3, num_workers=0, val_fraction=0)
    data.setup()
    n_classes = {"cifar10": 10, "cifar100": 100}[name]
    assert (data.num_classes, data.in_channels, data.image_size) == (n_classes, 3, 32)
    assert len(data.train_set) == {"cifar10": 5 * 4, "cifar100": 12}[name]  # the writers' defaults
    assert len(data.test_set) == len(test_images)
    assert len(data.train_set.classes) == n_classes  # read from batches.meta / meta
    x, y = next(iter(data.train_loader()))  # augmented: still 32 x 32
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert 0 <= int(y.min()) and int(y.max()) < n_classes
    xv, yv = next(iter(data.test_loader()))  # not augmented: exactly ToTensor + Normalize of the pickled pixels
    expected = normalized(test_images[:3].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), data.mean, data.std)
    torch.testing.assert_close(xv, expected)


def test_cifar_augmentation_switch(tmp_path):
    names = lambda data: [type(t).__name__ for t in data.transform(train=True).transforms]
    assert names(CIFAR10Data(root=str(tmp_path))) == ["RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert names(CIFAR100Data(root=str(tmp_path), augment=False)) == ["ToTensor", "Normalize"]
    crop = CIFAR10Data(root=str(tmp_path)).transform(train=True).transforms[0]
    assert (crop.size, crop.padding) == ((32, 32), 4)


@pytest.mark.parametrize("data_cls", [CIFAR10Data, CIFAR100Data])
def test_cifar_absent_without_download_names_the_path(tmp_path, data_cls):
    with pytest.raises(DataError) as info:
        data_cls(root=str(tmp_path), download=False, num_workers=0).setup()
    message = str(info.value)
    assert str(tmp_path / data_cls.dataset_cls.base_folder) in message
    assert "not found" in message and "dataset.download=true" in message and "MARGINLAB_DATA_DIR" in message


@pytest.mark.parametrize("data_cls", [CIFAR10Data, CIFAR100Data])
def test_cifar_download_without_network_is_a_data_error(tmp_path, monkeypatch, data_cls):
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    with pytest.raises(DataError) as info:
        data_cls(root=str(tmp_path / "cache"), download=True, num_workers=0).setup()
    message = str(info.value)
    assert f"could not download {data_cls.title} into {tmp_path / 'cache'}" in message
    assert "URLError" in message and data_cls.dataset_cls.url in message


@pytest.mark.parametrize("download", [False, True])
def test_cifar_corrupt_file_is_named(cifar, tmp_path, monkeypatch, download):
    name, data_cls, _ = cifar
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)  # re-download attempt fails
    _, _, _, folder, victim = CIFAR[name]
    path = tmp_path / folder / victim
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="is unreadable or corrupted") as info:
        data_cls(root=str(tmp_path), download=download, num_workers=0).setup()
    assert f"file {path} is" in str(info.value)


@pytest.mark.parametrize("data_cls", [MNISTData, CIFAR10Data, CIFAR100Data])
def test_root_that_is_a_file_is_a_config_error(tmp_path, data_cls):
    a_file = tmp_path / "data.txt"
    a_file.write_text("not a directory")
    with pytest.raises(ConfigError, match="not a directory"):
        data_cls(root=str(a_file), download=False).setup()
