"""The digits default reads scikit-learn's file and draws scikit-learn's split without importing scikit-learn."""

from __future__ import annotations

import gzip
import sys

import numpy as np
import pytest
import torch

from marginlab.data.digits import DigitsData, load_digits_arrays, stratified_train_test_split
from marginlab.errors import ConfigError, DataError


def test_the_images_are_load_digits():
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    expected_images, expected_labels = load_digits(return_X_y=True)
    assert np.array_equal(images, expected_images) and np.array_equal(labels, expected_labels)
    assert labels.dtype == np.int64


@pytest.mark.parametrize("fraction", [0.2, 0.1, 0.123, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 42])
def test_the_split_is_train_test_split_stratified(fraction, seed):
    """Same rows in the same order as scikit-learn's: runs, checkpoints and figures made before keep their test set."""
    from sklearn.model_selection import train_test_split

    _, labels = load_digits_arrays()
    rows = np.arange(labels.size)
    train, test = stratified_train_test_split(labels, fraction, seed)
    expected_train, expected_test = train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    assert np.array_equal(train, expected_train) and np.array_equal(test, expected_test)


def test_setup_does_not_import_scikit_learn(monkeypatch):
    for name in [n for n in sys.modules if n == "sklearn" or n.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    data = DigitsData(batch_size=64)
    data.setup()
    assert "sklearn" not in sys.modules
    assert len(data.test_set) == 360 and len(data.train_set) + len(data.val_set) == 1437
    x, y = data.test_set.tensors
    assert x.shape == (360, 1, 8, 8) and x.min() == -1 and x.max() == 1 and y.dtype == torch.int64


def test_a_test_fraction_that_leaves_a_class_out_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"dataset.test_fraction=0.001 .* 2 test images for 10 classes"):
        DigitsData(test_fraction=0.001).setup()


def test_an_unreadable_file_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "digits.csv.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="digits.csv.gz"):
        load_digits_arrays(bad)
    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(DataError, match=r"shape \(3,\)|shape"):
        load_digits_arrays(bad)
