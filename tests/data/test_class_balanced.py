"""The m-per-class batch sampler and the class-disjoint k-fold split of the training classes."""

from __future__ import annotations

import numpy as np
import pytest

from marginlab.data.class_balanced import ClassBalancedBatchSampler, class_disjoint_fold
from marginlab.errors import ConfigError

LABELS = np.repeat(np.arange(10), [5, 5, 5, 5, 5, 5, 5, 5, 5, 1])  # class 9 has a single image


def epoch(sampler, n: int) -> list[list[int]]:
    sampler.set_epoch(n)
    return [list(b) for b in sampler]


def test_each_batch_has_m_images_of_each_of_its_classes():
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=12, m=3, seed=0)
    batches = epoch(sampler, 0)
    assert len(batches) == len(sampler) == 46 // 12
    for batch in batches:
        classes, counts = np.unique(LABELS[batch], return_counts=True)
        assert classes.size == 4 and set(counts) == {3}


def test_a_small_class_is_drawn_with_replacement_and_others_without():
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=20, m=2, seed=3)
    for n in range(5):
        for batch in epoch(sampler, n):
            for c in np.unique(LABELS[batch]):
                picked = [i for i in batch if LABELS[i] == c]
                assert len(picked) == 2 and (c == 9 or len(set(picked)) == 2)


def test_batches_depend_on_seed_and_epoch_alone():
    a, b = (ClassBalancedBatchSampler(LABELS, 12, 3, seed=7, key=(7, 0, 0)) for _ in range(2))
    assert epoch(a, 2) == epoch(b, 2)
    assert epoch(a, 1) != epoch(a, 2)
    assert epoch(ClassBalancedBatchSampler(LABELS, 12, 3, seed=8), 2) != epoch(b, 2)
    b.set_epoch(2)
    assert next(iter(b)).key == (7, 0, 0, 2, 0)


@pytest.mark.parametrize(
    "batch, m, message",
    [(10, 3, "samples_per_class=3 is not allowed with dataset.batch_size=10"), (24, 2, "needs 12 classes per batch")],
)
def test_impossible_batches_are_refused(batch, m, message):
    with pytest.raises(ConfigError, match=message):
        ClassBalancedBatchSampler(LABELS, batch, m, seed=0)


def test_folds_are_contiguous_chunks_of_the_sorted_classes_like_kfold():
    classes = [9, 1, 5, 3, 7, 2, 4, 8, 6, 0]
    folds = [class_disjoint_fold(classes, 4, i).tolist() for i in range(4)]
    assert folds == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]  # sklearn KFold(4, shuffle=False) on range(10)
    assert sorted(sum(folds, [])) == list(range(10))


@pytest.mark.parametrize("k, i, message", [(1, 0, "num_folds=1"), (4, -1, "val_fold=-1"), (20, 0, "only 10 classes")])
def test_bad_folds_are_refused(k, i, message):
    with pytest.raises(ConfigError, match=message):
        class_disjoint_fold(range(10), k, i)
