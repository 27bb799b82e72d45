"""What every data set gives the trainer: loaders, class count and input geometry."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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
                 seed: int = 0, pin_memory: bool = False, drop_last: bool = False, in_memory: bool = False):
        self.batch_size = check_positive_int("dataset.batch_size", batch_size)
        self.eval_batch_size = check_positive_int("dataset.eval_batch_size", eval_batch_size or batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"dataset.num_workers={num_workers!r} is not allowed: it must be an integer >= 0")
        self.num_workers = num_workers
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.in_memory = bool(in_memory)  # decode once into a uint8 tensor on the device (data/in_memory.py)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._generator = torch.Generator()
        self.rank, self.world_size = 0, 1
        self._sampler: DistributedSampler | None = None

    def distribute(self, rank: int, world_size: int) -> None:
        """Data parallel: ``batch_size`` stays the global batch, each of ``world_size`` ranks gets its share."""
        if self.batch_size % world_size:
            raise ConfigError(f"dataset.batch_size={self.batch_size} is not allowed with {world_size} processes: "
                              f"the global batch must divide evenly (e.g. {self.batch_size // world_size * world_size})")
        self.rank, self.world_size = rank, world_size

    def setup(self) -> None:
        """Loads (or downloads) the data; raises DataError naming the path when it cannot."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Makes the shuffle order a function of (seed, epoch) alone, so a resumed run sees the same batches."""
        self._generator.manual_seed(self.seed * 100_003 + epoch)  # worker seeds (random augmentation)
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = None
        if train:  # one permutation per (seed, epoch); rank r takes every world_size-th index of it, so the
            # union of the ranks' k-th batches is the k-th batch of a single process with the same global batch
            sampler = self._sampler = DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank,
                                                         shuffle=True, seed=self.seed, drop_last=self.drop_last)
        return DataLoader(dataset, batch_size=self.batch_size // self.world_size if train else self.eval_batch_size,
                          sampler=sampler, generator=self._generator if train else None,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          drop_last=self.drop_last and train, persistent_workers=self.num_workers > 0)

    def loaders(self, device: torch.device):
        """(train, val) loaders: the in-memory path when ``in_memory`` (batches sliced and augmented as tensor
        ops on ``device``), else torch DataLoaders. ``val`` may be None (a training-only data set)."""
        if self.in_memory:
            from marginlab.data.in_memory import in_memory_loader

            return in_memory_loader(self, True, device), in_memory_loader(self, False, device)
        return self.train_loader(), self.val_loader()

    def train_loader(self) -> DataLoader:
        if self.train_set is None:
            self.setup()
        return self._loader(self.train_set, train=True)

    def val_loader(self) -> DataLoader:
        if self.val_set is None:
            self.setup()
        return self._loader(self.val_set, train=False)
