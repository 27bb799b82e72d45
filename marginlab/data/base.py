"""What every data set gives the trainer: loaders, class count and input geometry."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from marginlab.errors import ConfigError, DataError
from marginlab.heads.base import check_positive_int


def default_data_root(name: str) -> str:
    """<$MARGINLAB_DATA_DIR or $XDG_CACHE_HOME/marginlab or ~/.cache/marginlab>/<name>."""
    base = os.environ.get("MARGINLAB_DATA_DIR")
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(cache, "marginlab")
    return os.path.join(base, name)


def check_root(root: str | os.PathLike, must_exist: bool) -> Path:
    """Checks ``dataset.root``: a directory, or (when download is on) a path that can become one."""
    path = Path(os.path.expanduser(str(root)))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"dataset.root={str(root)!r} is not allowed: it exists but is not a directory")
    if must_exist and not path.is_dir():
        raise DataError(f"dataset.root={str(root)!r} does not exist")
    return path


def missing_data_error(problem: str, fix: str) -> DataError:
    """The DataError for data that is absent or cannot be fetched: what is wrong, how to get the files, and
    that ``dataset.root`` / ``$MARGINLAB_DATA_DIR`` choose where they are looked for."""
    return DataError(f"{problem}. To fix: {fix}, or set dataset.root=<dir> (or $MARGINLAB_DATA_DIR) "
                     "to a directory that has them")


class ClassificationData:
    """Base: subclasses set ``num_classes``, ``in_channels``, ``image_size`` and the two datasets in ``setup``."""

    name = "data"
    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, pin_memory: bool = False, drop_last: bool = False):
        self.batch_size = check_positive_int("dataset.batch_size", batch_size)
        self.eval_batch_size = check_positive_int("dataset.eval_batch_size", eval_batch_size or batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"dataset.num_workers={num_workers!r} is not allowed: it must be an integer >= 0")
        self.num_workers = num_workers
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._generator = torch.Generator()

    def setup(self) -> None:
        """Loads (or downloads) the data; raises DataError naming the path when it cannot."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Makes the shuffle order a function of (seed, epoch) alone, so a resumed run sees the same batches."""
        self._generator.manual_seed(self.seed * 100_003 + epoch)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, generator=self._generator if train else None,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=self.drop_last and train, persistent_workers=self.num_workers > 0)

    def train_loader(self) -> DataLoader:
        if self.train_set is None:
            self.setup()
        return self._loader(self.train_set, train=True)

    def val_loader(self) -> DataLoader:
        if self.val_set is None:
            self.setup()
        return self._loader(self.val_set, train=False)
