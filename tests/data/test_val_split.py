"""The validation split: held out of the training images (stratified, seeded), evaluated as val/, chosen on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import VisionDataset

from marginlab.data.base import stratified_split
from marginlab.data.digits import DigitsData
from marginlab.data.in_memory import in_memory_loader
from marginlab.data.torchvision_sets import CIFAR10Data
from marginlab.errors import ConfigError
from marginlab.training.train import objective, selection_metric


class Pixels(VisionDataset):
    """CIFAR as torchvision stores it: ``data`` N x 32 x 32 x 3 uint8, ``targets`` a list, PIL transforms."""

    def __init__(self, n: int, seed: int, transform):
        super().__init__(root="", transform=transform)
        self.data = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def test_stratified_split_holds_out_each_class_share_by_seed_alone():
    labels = np.repeat([0, 1, 2, 3], [10, 20, 1, 3])
    np.random.default_rng(0).shuffle(labels)
    kept, held = stratified_split(labels, 0.1, seed=5)
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(labels.size))  # a partition
    assert np.all(np.diff(kept) > 0) and np.all(np.diff(held) > 0)
    assert np.bincount(labels[held], minlength=4).tolist() == [1, 2, 0, 0]  # round(0.1 n_c); a lone image stays
    assert np.array_equal(stratified_split(labels, 0.1, seed=5)[1], held)  # deterministic
    assert any(not np.array_equal(stratified_split(labels, 0.1, seed=s)[1], held) for s in range(6, 10))
    kept, held = stratified_split(labels, 0.5, seed=0)
    assert np.bincount(labels[held], minlength=4).tolist() == [5, 10, 0, 2]  # never a whole class (3 -> 2, 1 -> 0)


def test_digits_val_is_a_stratified_slice_of_train_and_test_is_untouched():
    data, none = DigitsData(val_fraction=0.1, split_seed=0), DigitsData(val_fraction=0.0, split_seed=0)
    data.setup()
    none.setup()
    assert torch.equal(data.test_set.tensors[0], none.test_set.tensors[0])  # the test split does not move
    assert len(none.train_set) == 1437 and none.val_set is None and none.val_loader() is None
    train, val = np.asarray(data.train_set.indices), np.asarray(data.val_set.indices)
    assert len(val) == 142 and len(train) + len(val) == 1437 and not set(train) & set(val)
    counts = np.bincount(none.train_set.tensors[1].numpy()[val])
    assert counts.min() >= 14 and counts.max() <= 15  # ~10% of every digit
    again = DigitsData(val_fraction=0.1, split_seed=0)
    again.setup()
    assert np.array_equal(np.asarray(again.val_set.indices), val)  # same split on every run (any run seed)
    other = DigitsData(val_fraction=0.1, split_seed=1)
    other.setup()
    assert not np.array_equal(np.asarray(other.val_set.indices), val)


def test_the_in_memory_path_serves_the_same_three_splits():
    memory, loaders = DigitsData(in_memory=True), DigitsData(eval_batch_size=4096)
    train, val, test = memory.loaders(torch.device("cpu"))
    for split, loader in (("val", val), ("test", test)):
        x, y = torch.cat([b[0] for b in loader]), torch.cat([b[1] for b in loader])
        ((ref_x, ref_y),) = list(getattr(loaders, f"{split}_loader")())
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y), split
    assert train.images.shape[0] == len(loaders.train_set) == 1295


def test_torchvision_val_images_are_not_augmented():
    data = CIFAR10Data(root="unused", download=False, augment=True, batch_size=8, val_fraction=0.2, split_seed=3)
    data.train_set, data.test_set = Pixels(50, 0, data.transform(train=True)), Pixels(10, 1, data.transform(False))
    full = data.train_set
    data.hold_out_val()
    held = np.asarray(data.val_set.indices)
    assert len(held) == 10 and len(data.train_set) == 40
    plain = T.Compose([T.ToTensor(), T.Normalize(data.mean, data.std)])
    x, y = next(iter(data.val_loader()))
    assert torch.equal(x, torch.stack([plain(Image.fromarray(full.data[i])) for i in held[:8]]))
    assert y.tolist() == [full.targets[i] for i in held[:8]]
    assert full.transform is data.train_set.dataset.transform  # training images keep their crop and flip
    assert len(full.transform.transforms) == 4
    x_mem, y_mem = next(iter(in_memory_loader(data, "val", "cpu")))
    torch.testing.assert_close(x_mem, x[: x_mem.shape[0]])  # the in-memory path holds out the same images
    assert torch.equal(y_mem, y[: y_mem.shape[0]])


def test_val_fraction_is_checked():
    with pytest.raises(ConfigError, match=r"dataset.val_fraction=0.7"):
        DigitsData(val_fraction=0.7)
    data = DigitsData(val_fraction=0.0001)
    with pytest.raises(ConfigError, match=r"dataset.val_fraction=0.0001 holds out no image of the 1437"):
        data.setup()


def test_selection_metric_and_objective():
    assert selection_metric("auto", {}, has_val=True, has_test=True) == "val/acc"
    assert selection_metric("auto", {"lfw": None}, has_val=True, has_test=False) == "lfw/acc"  # face data
    assert selection_metric("auto", {}, has_val=False, has_test=True) == "epoch"  # the last epoch
    assert selection_metric("test", {}, has_val=True, has_test=True) == "test/acc"
    assert selection_metric("last", {}, has_val=True, has_test=True) == "epoch"
    with pytest.raises(ConfigError, match=r"trainer.best_on=val .*dataset.val_fraction > 0"):
        selection_metric("val", {}, has_val=False, has_test=True)
    assert objective({"best_metric": "val/acc", "best/val/acc": 0.9, "val/acc": 0.8}) == 0.9
    assert math.isnan(objective({"best_metric": "epoch", "best/epoch": 3}))


def test_best_checkpoint_is_chosen_on_val_and_reports_test_at_that_epoch(run_train, metrics):
    code, run_dir = run_train("logger=quiet", "trainer.epochs=3")
    assert code == 0
    summary, rows = metrics[0](run_dir), metrics[1](run_dir)
    chosen = max(rows, key=lambda r: r["val/acc"])  # the first of equals, as `>` keeps it
    assert summary["best_metric"] == "val/acc" and summary["best/epoch"] == chosen["epoch"]
    assert summary["best/val/acc"] == chosen["val/acc"] and summary["best/test/acc"] == chosen["test/acc"]
    assert summary["test/acc"] == rows[-1]["test/acc"] and summary["val/acc"] == rows[-1]["val/acc"]
    assert "test/feature_norm/mean" in rows[-1] and "val/feature_norm/mean" not in rows[-1]  # the probe: test
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["state"]["epoch"] == chosen["epoch"]
