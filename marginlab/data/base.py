"""What every data set gives the trainer: loaders, class count and input geometry."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    SequentialSampler,
    Subset,
    TensorDataset,
    get_worker_info,
)

from marginlab.checks import check_float, check_positive_int
from marginlab.data.batch_count import no_batches_error
from marginlab.errors import ConfigError, DataError, MarginlabError


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
    return DataError(
        f"{problem}. To fix: {fix}, or set dataset.root=<dir> (or $MARGINLAB_DATA_DIR) to a directory that has them"
    )


def check_no_link_loops(root: str | os.PathLike) -> None:
    """DataError naming the link when a symlinked directory under ``root`` leads back to one of its own
    ancestors (an ``os.walk(followlinks=True)`` listing, as torchvision's ImageFolder does, would repeat the
    tree until the path is too long); links that do not loop stay followed."""

    def visit(path: str, real: str, ancestors: frozenset) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return  # unreadable: left for the listing itself to report
        for entry in entries:
            if not entry.is_dir():  # follows links; a broken link is not a directory
                continue
            target = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
            if target in ancestors:
                raise DataError(
                    f"{entry.path} is a symbolic link to {target}, a folder that contains it: "
                    f"listing {root} would go round this loop forever. To fix: remove the link"
                )
            visit(entry.path, target, ancestors | {target})

    real_root = os.path.realpath(root)
    if os.path.isdir(real_root):
        visit(str(root), real_root, frozenset({real_root}))


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The class label of every item: a TensorDataset's second tensor, else ``.targets`` (torchvision sets)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy()
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    return np.asarray(dataset.targets)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) sorted indices: ``round(fraction * n_c)`` random items of each class c (never all of
    them) are held out, chosen by ``seed`` alone, so the split is the same on every run and machine."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    held = np.minimum(np.rint(fraction * counts), np.maximum(counts - 1, 0)).astype(np.int64)
    order = np.lexsort((np.random.default_rng(seed).random(labels.size), labels))  # by class, shuffled within
    rank = np.arange(labels.size) - (np.cumsum(counts) - counts)[labels[order]]  # position within its class
    out = rank < held[labels[order]]
    return np.sort(order[~out]), np.sort(order[out])


def evaluation_copy(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of a torchvision data set that reads the same files with ``transform``."""
    from torchvision.datasets.vision import StandardTransform

    view = copy.copy(dataset)
    view.transform = transform
    view.transforms = StandardTransform(transform, getattr(dataset, "target_transform", None))
    return view


class Loaders(NamedTuple):
    """A data set's loaders; ``val`` (held out from training) and ``test`` may be None."""

    train: object
    val: object | None
    test: object | None


class WorkerError(DataError):
    """A MarginlabError raised inside a DataLoader worker. torch re-raises it in the main process as
    ``WorkerError("Caught WorkerError in DataLoader worker ... Original Traceback ...")``; the constructor keeps
    only the worker's own message, so the user sees one line naming the file, not the worker's traceback."""

    def __init__(self, message: str):
        head, sep, tail = str(message).rpartition(f"{__name__}.WorkerError: ")
        super().__init__(tail.strip() if sep and head.startswith("Caught WorkerError") else message)


class SeededBatch(list):
    """Sample indices of one batch plus ``key``: the (seed, rank, split, epoch, batch number) its worker seeds from."""

    key: tuple = ()


def seed_worker(key: tuple) -> None:
    """Seeds python ``random``, numpy and torch (CPU) in this process from ``key`` alone."""
    words = np.random.SeedSequence([int(k) % 2**64 for k in key]).generate_state(4, np.uint64)
    random.seed(int(words[0]))
    np.random.seed(words[1:2].view(np.uint32))
    torch.default_generator.manual_seed(int(words[2]))  # workers draw on the CPU only (torch.manual_seed: 150 us more)


class SeededBatchSampler(Sampler):
    """Batches of ``sampler`` as SeededBatch; the epoch comes from ``sampler.epoch`` (DistributedSampler's
    ``set_epoch``), 0 for an unshuffled sampler."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, key: tuple):
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.sampler, self.key = sampler, tuple(key)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        for n, indices in enumerate(self.batches):
            batch = SeededBatch(indices)
            batch.key = (*self.key, epoch, n)
            yield batch


class SeededDataset(Dataset):
    """``dataset`` as a DataLoader sees it. In a worker process each SeededBatch first reseeds ``random``,
    numpy and torch from its key, so random augmentation is a function of (seed, epoch, rank, batch) and not
    of which worker draws the batch or how many epochs that worker has lived (``persistent_workers``); and
    a MarginlabError leaves the worker as a WorkerError carrying the same message."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __getitems__(self, batch: list) -> list:
        if get_worker_info() is None:
            return self._fetch(batch)
        if isinstance(batch, SeededBatch):
            seed_worker(batch.key)
        try:
            return self._fetch(batch)
        except MarginlabError as exc:
            raise WorkerError(str(exc)) from None

    def _fetch(self, batch: list) -> list:
        many = getattr(self.dataset, "__getitems__", None)
        return many(batch) if many else [self.dataset[i] for i in batch]


class ClassificationData:
    """Base: subclasses set ``num_classes``, ``in_channels``, ``image_size``, and in ``setup`` ``train_set`` and
    ``test_set`` (None: no closed-set test split), then call ``hold_out_val`` for ``val_set``.

    ``val_fraction``: the share of each class's training images held out as the validation split (best.pt and
    sweeps select on it; 0: none), drawn with ``split_seed``; ``test_set`` is never used to select.
    """

    name = "data"
    num_classes: int
    in_channels: int
    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
        in_memory: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ):
        self.batch_size = check_positive_int("dataset.batch_size", batch_size)
        self.eval_batch_size = check_positive_int("dataset.eval_batch_size", eval_batch_size or batch_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"dataset.num_workers={num_workers!r} is not allowed: it must be an integer >= 0")
        self.num_workers = num_workers
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        self.in_memory = bool(in_memory)  # decode once into a uint8 tensor on the device (data/in_memory.py)
        self.val_fraction = check_float("dataset.val_fraction", val_fraction, low=0.0, high=0.5)
        self.split_seed = int(split_seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None  # held out from the training images
        self.test_set: Dataset | None = None  # the official test (or, for ImageNet, validation) split
        # evaluation sets of classes the head never trains on, scored by retrieval (eval/retrieval_sets.py)
        self.retrieval_sets: dict[str, Dataset] = {}
        self._generator = torch.Generator()
        self.rank, self.world_size = 0, 1
        self._sampler: DistributedSampler | None = None

    def distribute(self, rank: int, world_size: int) -> None:
        """Data parallel: ``batch_size`` stays the global batch, each of ``world_size`` ranks gets its share."""
        if self.batch_size % world_size:
            raise ConfigError(
                f"dataset.batch_size={self.batch_size} is not allowed with {world_size} processes: "
                f"the global batch must divide evenly (e.g. {self.batch_size // world_size * world_size})"
            )
        self.rank, self.world_size = rank, world_size

    def setup(self) -> None:
        """Loads (or downloads) the data; raises DataError naming the path when it cannot."""
        raise NotImplementedError

    def hold_out_val(self) -> None:
        """Moves a stratified ``val_fraction`` of ``train_set`` to ``val_set`` (with the evaluation transform)."""
        if self.val_fraction == 0:
            self.val_set = None
            return
        kept, held = stratified_split(dataset_labels(self.train_set), self.val_fraction, self.split_seed)
        if held.size == 0:
            raise ConfigError(
                f"dataset.val_fraction={self.val_fraction!r} holds out no image of the "
                f"{kept.size} training images: raise it, or set 0 for no validation split"
            )
        full = self.train_set
        self.train_set, self.val_set = Subset(full, kept), Subset(self.evaluation_view(full), held)

    def evaluation_view(self, dataset: Dataset) -> Dataset:
        """``dataset``'s images as evaluation sees them (no augmentation); subclasses with transforms override."""
        return dataset

    def set_epoch(self, epoch: int) -> None:
        """Makes the shuffle order and the workers' augmentation a function of (seed, epoch) alone, so a
        resumed run sees the same batches."""
        self._generator.manual_seed(self.seed * 100_003 + epoch)  # the in-memory path's draws
        if self._sampler is not None:
            self._sampler.set_epoch(epoch)  # the permutation, and (via SeededBatchSampler) the worker seeds

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        """Workers are persistent, and each batch reseeds its worker's RNGs from (seed, rank, split, epoch,
        batch number): the stream does not depend on worker lifetime or the order of the process's history."""
        if train:  # one permutation per (seed, epoch); rank r takes every world_size-th index of it, so the
            # union of the ranks' k-th batches is the k-th batch of a single process with the same global batch
            sampler = self._sampler = DistributedSampler(
                dataset,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=True,
                seed=self.seed,
                drop_last=self.drop_last,
            )
        else:
            sampler = SequentialSampler(dataset)
        batch = self.batch_size // self.world_size if train else self.eval_batch_size
        batches = SeededBatchSampler(
            sampler, batch, self.drop_last and train, key=(self.seed, self.rank, 0 if train else 1)
        )
        if train and len(batches) == 0:
            raise no_batches_error(len(dataset), len(sampler), batch, self.world_size, self.drop_last)
        return DataLoader(
            SeededDataset(dataset),
            batch_sampler=batches,
            generator=self._generator if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def loaders(self, device: torch.device) -> Loaders:
        """(train, val, test) loaders: the in-memory path when ``in_memory`` (batches sliced and augmented as
        tensor ops on ``device``), else torch DataLoaders; val or test is None when the set has no such split."""
        if self.in_memory:
            from marginlab.data.in_memory import in_memory_loader

            if self.train_set is None:
                self.setup()
            sets = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
            return Loaders(*(None if d is None else in_memory_loader(self, split, device) for split, d in sets.items()))
        return Loaders(self.train_loader(), self.val_loader(), self.test_loader())

    def train_loader(self) -> DataLoader:
        if self.train_set is None:
            self.setup()
        return self._loader(self.train_set, train=True)

    def val_loader(self) -> DataLoader | None:
        """The held-out validation split's loader, None when ``val_fraction`` is 0."""
        if self.train_set is None:
            self.setup()
        return None if self.val_set is None else self._loader(self.val_set, train=False)

    def retrieval_loaders(self) -> dict[str, DataLoader]:
        """A loader (in order, no augmentation) per retrieval set; {} for a set without unseen classes."""
        if self.train_set is None:
            self.setup()
        return {name: self._loader(dataset, train=False) for name, dataset in self.retrieval_sets.items()}

    def test_loader(self) -> DataLoader | None:
        """The test split's loader, None for a set without one (face training sets)."""
        if self.train_set is None:
            self.setup()
        return None if self.test_set is None else self._loader(self.test_set, train=False)
