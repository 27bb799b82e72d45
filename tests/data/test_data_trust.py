"""Data loaders you can trust (issue #12): worker randomness that resumes exactly, no run without a batch,
no symlink loop listed over and over, and worker errors as the one line the main process would give."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from marginlab.data.base import ClassificationData, WorkerError
from marginlab.data.digits import DigitsData
from marginlab.data.imagenet import ImageNetData
from marginlab.data.in_memory import in_memory_loader
from marginlab.errors import ConfigError, DataError


def write_tree(root, splits=("train", "val"), wnids=("n01440764", "n01443537", "n01484850"), per=2) -> None:
    """<root>/<split>/<wnid>/<wnid>_<i>.JPEG (tiny real JPEGs), the layout ImageFolder reads."""
    for split in splits:
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per):
                Image.new("RGB", (8, 8), (i * 40, 80, 120)).save(root / split / wnid / f"{wnid}_{i}.JPEG")


class Draws(Dataset):
    """Sample i: (i, a draw from python ``random``, one from numpy, one from torch): what augmentation uses."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        if i == 11 and getattr(self, "broken", False):
            raise DataError("sample 11: cannot decode the image (broken on purpose)")
        return torch.tensor(
            [float(i), random.random(), float(np.random.rand()), torch.rand(()).item()], dtype=torch.float64
        )


class DrawsData(ClassificationData):
    num_classes, in_channels, image_size = 2, 1, 1

    def setup(self) -> None:
        self.train_set, self.test_set = Draws(), Draws()


def epoch_draws(data: DrawsData, loader, epoch: int) -> torch.Tensor:
    data.set_epoch(epoch)
    return torch.cat(list(loader))


def test_worker_randomness_depends_on_seed_and_epoch_only():
    """Epoch 1 through workers that already served epoch 0 (persistent) == epoch 1 through fresh workers,
    for python random, numpy and torch alike; and the draws differ between batches and epochs."""
    lived = DrawsData(batch_size=3, num_workers=2, seed=7)
    lived.setup()
    loader = lived.train_loader()
    first, second = epoch_draws(lived, loader, 0), epoch_draws(lived, loader, 1)
    fresh = DrawsData(batch_size=3, num_workers=2, seed=7)
    fresh.setup()
    again = epoch_draws(fresh, fresh.train_loader(), 1)
    assert torch.equal(second, again)
    for column in (1, 2, 3):  # random, numpy, torch: all drawn afresh per batch, not repeated
        assert len(set(second[:, column].tolist())) == 12 and not torch.equal(first[:, column], second[:, column])


def test_a_train_loader_without_batches_is_refused():
    data = DigitsData(batch_size=2048, drop_last=True)
    with pytest.raises(
        ConfigError,
        match=r"dataset.batch_size=2048 gives 0 training batches with "
        r"dataset.drop_last=true: the training set has 1295 images.*"
        r"at most 1295, or dataset.drop_last=false",
    ):
        data.train_loader()
    assert len(DigitsData(batch_size=2048).train_loader()) == 1  # without drop_last the short batch stays


def test_the_per_process_share_is_named_with_several_processes():
    data = DigitsData(batch_size=2048, drop_last=True)
    data.distribute(0, 2)
    with pytest.raises(
        ConfigError,
        match=r"1295 images \(647 per process on 2 processes, fewer than one batch "
        r"of 1024 per process\).*at most 1294",
    ):
        data.train_loader()


def test_the_in_memory_loader_without_batches_is_refused():
    data = DigitsData(batch_size=2048, drop_last=True, in_memory=True)
    with pytest.raises(ConfigError, match=r"gives 0 training batches.*1295 images"):
        in_memory_loader(data, "train", "cpu")
    with pytest.raises(ConfigError, match=r"gives 0 training batches"):
        data.loaders(torch.device("cpu"))


def test_imagenet_symlink_loop_is_refused(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "train" / "n01440764" / "up").symlink_to(tmp_path / "train", target_is_directory=True)
    with pytest.raises(DataError, match=r"n01440764/up is a symbolic link to .*train, a folder that contains it"):
        ImageNetData(root=str(tmp_path)).setup()


def test_imagenet_follows_symlinked_class_folders(tmp_path):
    write_tree(tmp_path)
    write_tree(tmp_path / "other", splits=("train",), wnids=("n09999999",))
    for split in ("train", "val"):
        (tmp_path / split / "n09999999").symlink_to(tmp_path / "other" / "train" / "n09999999")
    data = ImageNetData(root=str(tmp_path), val_fraction=0)  # 2 images a class: none to hold out
    assert data.num_classes == 4 and len(data.train_set) == 8


def test_a_worker_error_is_the_workers_one_line():
    data = DrawsData(batch_size=4, num_workers=2)
    data.setup()
    data.train_set.broken = True
    data.set_epoch(0)
    with pytest.raises(WorkerError) as err:
        list(data.train_loader())
    assert str(err.value) == "sample 11: cannot decode the image (broken on purpose)"
    assert isinstance(err.value, DataError)
