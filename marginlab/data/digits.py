"""The embedded default: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), no download.

The images come from the file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, what
``sklearn.datasets.load_digits`` reads) and the test split is the one ``train_test_split(images, labels,
test_size=test_fraction, stratify=labels, random_state=split_seed)`` draws, both without importing
scikit-learn: its import (SciPy included) cost more CPU time than the whole training loop of the default run.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from marginlab.checks import check_float
from marginlab.data.base import ClassificationData
from marginlab.errors import ConfigError, DataError


def digits_file() -> Path:
    """``digits.csv.gz`` inside the installed scikit-learn package, found without importing the package."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "dataset=digits reads its images from scikit-learn, which is not installed: pip install scikit-learn"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"dataset=digits: {path} does not exist; reinstall scikit-learn")
    return path


def load_digits_arrays(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 N x 64 in 0..16, labels int64 N): ``load_digits(return_X_y=True)``, read the same way
    (the last CSV column is the label)."""
    path = digits_file() if path is None else path
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            table = np.loadtxt(f, delimiter=",")
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"dataset=digits: cannot read {path} ({err}); reinstall scikit-learn") from None
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"dataset=digits: {path} has shape {table.shape}, expected N x 65 (64 pixels, a label)")
    return table[:, :-1], table[:, -1].astype(np.int64)


def approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples per class in ``n_draws`` stratified draws, ties broken by ``rng``: scikit-learn's
    ``sklearn.utils.extmath._approximate_mode`` (the approximate mode of the multivariate hypergeometric)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:  # by decreasing left-over fraction; a tie is drawn at random
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            floored[rng.choice(inds, size=add_now, replace=False)] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def stratified_train_test_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), in the order ``train_test_split(..., test_size=test_fraction,
    stratify=labels, random_state=seed)`` returns the rows: the first split of scikit-learn's
    ``StratifiedShuffleSplit._iter_indices`` with ``n_test = ceil(test_fraction * n)``."""
    labels = np.asarray(labels)
    n_test = math.ceil(test_fraction * labels.size)
    n_train = labels.size - n_test
    classes, y_indices, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    if min(n_train, n_test) < classes.size or class_counts.min() < 2:
        raise ConfigError(
            f"dataset.test_fraction={test_fraction!r} is not allowed: it leaves {n_train} training "
            f"and {n_test} test images for {classes.size} classes; each split needs one of each"
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = approximate_mode(class_counts, n_train, rng)
    t_i = approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(classes.size):
        permuted = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(permuted[: n_i[i]])
        test.extend(permuted[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(train), rng.permutation(test)


class DigitsData(ClassificationData):
    """The 8x8 digits with a fixed stratified train/test split (``split_seed``); the validation split is then
    held out of the training part (``val_fraction``, base class)."""

    name = "digits"
    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(self, test_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction = check_float("dataset.test_fraction", test_fraction, low=0.0, high=0.9, low_inclusive=False)

    def setup(self) -> None:
        images, labels = load_digits_arrays()
        train, test = stratified_train_test_split(labels, self.test_fraction, self.split_seed)
        self.train_set = TensorDataset(to_images(images[train]), torch.tensor(labels[train], dtype=torch.int64))
        self.test_set = TensorDataset(to_images(images[test]), torch.tensor(labels[test], dtype=torch.int64))
        self.hold_out_val()


def to_images(pixels: np.ndarray) -> torch.Tensor:
    """N x 64 pixels in 0..16 -> N x 1 x 8 x 8 floats in [-1, 1]."""
    return (torch.tensor(pixels, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0 - 0.5) / 0.5


class DigitsRetrievalData(ClassificationData):
    """The digits split by class, for metric learning without a download: digits ``0 .. train_classes - 1`` train
    the head (a classifier over them), the other digits are the ``test`` retrieval set, classes the model never
    saw (the class-disjoint protocol of Oh Song et al. 2016, shrunk to the embedded data)."""

    name = "digits_retrieval"
    in_channels = 1
    image_size = 8

    def __init__(self, train_classes: int = 5, **kwargs):
        super().__init__(**kwargs)
        if isinstance(train_classes, bool) or not isinstance(train_classes, int) or not 2 <= train_classes <= 8:
            raise ConfigError(
                f"dataset.train_classes={train_classes!r} is not allowed: an integer from 2 to 8 "
                "(digits below it train, the rest are retrieved)"
            )
        self.num_classes = train_classes

    def setup(self) -> None:
        images, labels = load_digits_arrays()
        seen = labels < self.num_classes
        self.train_set = TensorDataset(to_images(images[seen]), torch.tensor(labels[seen], dtype=torch.int64))
        self.retrieval_sets = {"test": TensorDataset(to_images(images[~seen]), torch.tensor(labels[~seen]))}
        self.hold_out_val()
