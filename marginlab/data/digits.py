"""The embedded default: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from marginlab.checks import check_float
from marginlab.data.base import ClassificationData


class DigitsData(ClassificationData):
    """``sklearn.datasets.load_digits`` with a fixed stratified train/test split (``split_seed``); the validation
    split is then held out of the training part (``val_fraction``, base class)."""

    name = "digits"
    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(self, test_fraction: float = 0.2, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction = check_float("dataset.test_fraction", test_fraction, low=0.0, high=0.9,
                                         low_inclusive=False)

    def setup(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        x_train, x_test, y_train, y_test = train_test_split(
            images, labels, test_size=self.test_fraction, stratify=labels, random_state=self.split_seed)
        to_images = lambda x: (torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0 - 0.5) / 0.5
        self.train_set = TensorDataset(to_images(x_train), torch.tensor(y_train, dtype=torch.int64))
        self.test_set = TensorDataset(to_images(x_test), torch.tensor(y_test, dtype=torch.int64))
        self.hold_out_val()
