"""Class-balanced batches for metric learning: each batch holds ``m`` images of each of ``batch_size / m``
classes (the "m per class" sampler of Musgrave et al. 2020, "A Metric Learning Reality Check", sec. 4.1),
and the class-disjoint k-fold split of the training classes that protocol validates on."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from marginlab.data.base import SeededBatch
from marginlab.errors import ConfigError


class ClassBalancedBatchSampler(Sampler):
    """Yields ``len(labels) // batch_size`` batches per epoch (as SeededBatch, so workers reseed per batch):
    ``batch_size / m`` distinct classes drawn at random, then ``m`` images of each (with replacement only
    for a class with fewer than ``m`` images). The draws depend on (seed, epoch) alone: ``set_epoch``."""

    def __init__(self, labels, batch_size: int, m: int, seed: int, key: tuple = ()):
        labels = np.asarray(labels, dtype=np.int64)
        classes, inverse = np.unique(labels, return_inverse=True)
        if batch_size % m:
            raise ConfigError(
                f"dataset.samples_per_class={m} is not allowed with dataset.batch_size={batch_size}: "
                f"the batch must hold whole groups of {m} (e.g. batch_size={batch_size // m * m or m})"
            )
        if batch_size // m > classes.size:
            raise ConfigError(
                f"dataset.batch_size={batch_size} with dataset.samples_per_class={m} needs {batch_size // m} "
                f"classes per batch, but the training set has {classes.size}: lower batch_size or raise m"
            )
        self.by_class = [np.flatnonzero(inverse == c) for c in range(classes.size)]
        self.batch_size, self.m, self.seed, self.key = batch_size, m, int(seed), tuple(key)
        self.num_batches = labels.size // batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])  # a function of (seed, epoch): resume replays it
        per_batch = self.batch_size // self.m
        for n in range(self.num_batches):
            batch = SeededBatch()
            for c in rng.choice(len(self.by_class), per_batch, replace=False):
                pool = self.by_class[c]
                batch.extend(int(i) for i in rng.choice(pool, self.m, replace=pool.size < self.m))
            batch.key = (*self.key, self.epoch, n)
            yield batch


def class_disjoint_fold(classes, num_folds: int, fold: int) -> np.ndarray:
    """The classes held out as validation in fold ``fold`` of ``num_folds``: the sorted classes cut into
    ``num_folds`` contiguous chunks (the first ``n % num_folds`` one longer), chunk ``fold`` -- what
    powerful-benchmarker's ClassDisjointSplitManager gets from sklearn's unshuffled KFold."""
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ConfigError(f"dataset.num_folds={num_folds!r} is not allowed: it must be an integer >= 2")
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < num_folds:
        raise ConfigError(f"dataset.val_fold={fold!r} is not allowed: choose 0 to {num_folds - 1}, or null for none")
    ordered = np.unique(np.asarray(classes))
    if ordered.size < num_folds:
        raise ConfigError(
            f"dataset.num_folds={num_folds} is not allowed: the training split has only {ordered.size} classes"
        )
    return np.array_split(ordered, num_folds)[fold]
