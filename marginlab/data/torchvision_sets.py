"""MNIST, CIFAR-10 and CIFAR-100 through torchvision's own dataset classes, readers and download code.

What this module adds is the error handling: whatever torchvision raises while finding, downloading or
reading the files becomes a ``DataError`` that names the path and says how to get the files.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Callable

from torchvision import datasets
from torchvision import transforms as T
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity

from marginlab.data.base import ClassificationData, check_root, evaluation_copy, missing_data_error
from marginlab.errors import DataError

#: (path, check that the file is intact) for each file a torchvision data set reads
ExpectedFiles = list[tuple[Path, Callable[[Path], bool]]]


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line (torchvision's download errors span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def _parses(reader: Callable[[str], object]) -> Callable[[Path], bool]:
    """A check that torchvision's ``reader`` can parse a file (used only to name a corrupt file)."""

    def check(path: Path) -> bool:
        try:
            reader(str(path))
        except Exception:
            return False
        return True

    return check


class TorchvisionData(ClassificationData):
    """Base of the downloadable sets: ``dataset_cls(root, train=..., transform=..., download=...)``."""

    title: str  # the name used in messages
    dataset_cls: type[datasets.VisionDataset]
    url: str  # where the files can be fetched by hand
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, root: str, download: bool = True, augment: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.root = check_root(root, must_exist=False)
        self.download = bool(download)
        self.augment = bool(augment)

    def setup(self) -> None:
        """Loads both splits (downloading them first when ``download`` is on), then holds out the validation
        images from the training split; DataError when it cannot."""
        self.train_set = self._open(train=True)
        self.test_set = self._open(train=False)
        self.hold_out_val()

    def evaluation_view(self, dataset: datasets.VisionDataset) -> datasets.VisionDataset:
        return evaluation_copy(dataset, self.transform(train=False))

    def augmentation(self) -> list:
        """Random training transforms applied to the PIL image before ToTensor (none by default)."""
        return []

    def transform(self, train: bool) -> T.Compose:
        steps = self.augmentation() if train and self.augment else []
        return T.Compose([*steps, T.ToTensor(), T.Normalize(self.mean, self.std)])

    def expected_files(self) -> ExpectedFiles:
        """Every file torchvision reads for this set (both splits), with a check that it is intact."""
        raise NotImplementedError

    def _open(self, train: bool) -> datasets.VisionDataset:
        try:
            return self.dataset_cls(
                str(self.root), train=train, transform=self.transform(train), download=self.download
            )
        # torchvision raises RuntimeError (not found / md5 mismatch / MNIST download), URLError and other
        # OSErrors (CIFAR download, disk), and pickle / ValueError / AssertionError on a corrupt file.
        except Exception as err:
            raise self._explain(err) from err

    def _explain(self, err: Exception) -> DataError:
        """Turns torchvision's exception into a DataError: files missing, download failed, or file corrupt."""
        files = self.expected_files()
        folder = files[0][0].parent
        names = ", ".join(path.name for path, _ in files)
        missing = [path.name for path, _ in files if not path.is_file()]
        if missing and self.download:
            return missing_data_error(
                f"could not download {self.title} into {self.root} ({_one_line(err)})",
                f"check the network connection, or download {self.title} from {self.url} yourself "
                f"and put its files ({names}) in {folder}",
            )
        if missing:
            return missing_data_error(
                f"{self.title} not found in {folder} (missing: {', '.join(missing)})",
                "set dataset.download=true to download it there, or put the files there yourself",
            )
        bad = next((path for path, intact in files if not intact(path)), None)
        what, it = (f"file {bad} is", "it") if bad else (f"files in {folder} are", "them")
        return DataError(
            f"{self.title} {what} unreadable or corrupted ({_one_line(err)}). To fix: delete "
            f"{it} and set dataset.download=true to fetch a fresh copy, or replace {it} by hand"
        )


class MNISTData(TorchvisionData):
    """``torchvision.datasets.MNIST``: the raw IDX files in ``<root>/MNIST/raw/`` (un-gzipped).

    ``augment`` has no effect: flips and crops change what a digit looks like.
    """

    name = "mnist"
    title = "MNIST"
    dataset_cls = datasets.MNIST
    url = datasets.MNIST.mirrors[0]
    num_classes = 10
    in_channels = 1
    image_size = 28
    mean, std = (0.1307,), (0.3081,)  # pixel mean/std of the 60k training images (the usual constants)

    def expected_files(self) -> ExpectedFiles:
        raw = self.root / "MNIST" / "raw"  # torchvision's MNIST.raw_folder
        names = [os.path.splitext(archive)[0] for archive, _ in datasets.MNIST.resources]  # minus .gz
        return [(raw / name, _parses(read_image_file if "images" in name else read_label_file)) for name in names]


class CIFAR10Data(TorchvisionData):
    """``torchvision.datasets.CIFAR10``: the python pickles in ``<root>/cifar-10-batches-py/``."""

    name = "cifar10"
    title = "CIFAR-10"
    dataset_cls = datasets.CIFAR10
    url = datasets.CIFAR10.url
    num_classes = 10
    in_channels = 3
    image_size = 32
    # per-channel mean/std of the 50k training images
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def augmentation(self) -> list:
        # the standard CIFAR augmentation (He et al. 2016, "Deep Residual Learning", sec. 4.2)
        return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]

    def expected_files(self) -> ExpectedFiles:
        cls = self.dataset_cls
        folder = self.root / cls.base_folder
        entries = [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]
        return [(folder / name, partial(check_integrity, md5=md5)) for name, md5 in entries]


class CIFAR100Data(CIFAR10Data):
    """``torchvision.datasets.CIFAR100`` (fine labels): the python pickles in ``<root>/cifar-100-python/``."""

    name = "cifar100"
    title = "CIFAR-100"
    dataset_cls = datasets.CIFAR100
    url = datasets.CIFAR100.url
    num_classes = 100
    # per-channel mean/std of the 50k training images
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
