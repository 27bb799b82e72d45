"""Data sets that fit in memory (digits, MNIST, CIFAR) held as one tensor on the training device.

The images are decoded once into a uint8 tensor (N x C x H x W) on the device. A batch is a slice of a
permutation drawn from a seeded generator; augmentation (random crop with zero padding, horizontal flip)
and normalisation are batched tensor ops on the device: no per-sample Python, no worker processes,
no host-to-device copy per batch. ``InMemoryLoader`` is an iterable with ``__len__`` that yields
``(images float32, labels int64)`` like a DataLoader, so the engine uses it unchanged.

Randomness: each epoch's permutation and augmentation parameters are drawn on the CPU from one
``torch.Generator`` (seeded per epoch as (seed, epoch) by ``set_epoch``, the formula of
``ClassificationData.set_epoch``), so the batches are the same on every device and a resumed run
sees exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

from marginlab.checks import check_positive_int
from marginlab.data.batch_count import no_batches_error
from marginlab.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed for ``epoch``: the same formula as ``ClassificationData.set_epoch``."""
    return int(seed) * 100_003 + int(epoch)


def to_uint8_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """(images uint8 N x C x H x W, labels int64 N) read from a torchvision data set's ``.data`` / ``.targets``.

    MNIST keeps ``data`` as an N x H x W uint8 tensor, CIFAR-10/100 as an N x H x W x C uint8 numpy
    array with ``targets`` a list; the transforms of the data set are not applied (they are replaced by
    the batched ops of ``InMemoryLoader``).
    """
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    if data is None or targets is None:
        raise ConfigError(f"{type(dataset).__name__} has no .data/.targets arrays: it cannot be held in memory")
    images = torch.as_tensor(np.asarray(data)) if not isinstance(data, Tensor) else data
    if images.dtype != torch.uint8:
        raise ConfigError(f"{type(dataset).__name__}.data has dtype {images.dtype}, expected uint8 pixels")
    if images.dim() == 3:  # N x H x W (MNIST): one channel
        images = images.unsqueeze(1)
    elif images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # N x H x W x C (CIFAR) -> N x C x H x W
    elif images.dim() != 4:
        raise ConfigError(
            f"{type(dataset).__name__}.data has shape {tuple(images.shape)}; expected N x H x W or N x H x W x C"
        )
    labels = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    return images.contiguous(), labels


def augmentation_params(transforms: Sequence) -> tuple[int, bool]:
    """(crop padding, horizontal flip) of a data module's training transforms.

    Understands ``RandomCrop(size, padding=p)`` at the image's own size with zero fill and
    ``RandomHorizontalFlip(0.5)``: the standard CIFAR augmentation. Anything else is a ConfigError
    (use the DataLoader path for it).
    """
    from torchvision import transforms as T  # here, not at the top: data without augmentation never needs it

    padding, flip = 0, False
    for t in transforms:
        if isinstance(t, T.RandomCrop) and not t.pad_if_needed and t.fill == 0 and t.padding_mode == "constant":
            pad = t.padding
            pads = {pad} if isinstance(pad, int) else set(pad)
            if len(pads) != 1:
                raise ConfigError(
                    f"in-memory data: {t} has unequal padding; only one padding on every side is supported"
                )
            padding = int(next(iter(pads)))
        elif isinstance(t, T.RandomHorizontalFlip) and t.p == 0.5:
            flip = True
        else:
            raise ConfigError(
                f"in-memory data cannot apply the transform {t} on the device; "
                "set dataset.in_memory=false to use the DataLoader path"
            )
    return padding, flip


def random_crop(images: Tensor, padding: int, offsets: Tensor) -> Tensor:
    """Crops of the input's size from the zero-padded batch: sample i starts at row ``offsets[i, 0]``,
    column ``offsets[i, 1]`` (each in [0, 2 padding]) of the padded image. As ``RandomCrop(size, padding)``:
    pixels from outside the image are 0 (before normalisation)."""
    if padding == 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    # every window at once as a view: (n, row offset, column offset, c, h, w); then one gather of n windows
    # (4x faster on CPU than indexing the pixels with broadcast row/column index tensors)
    s_n, s_c, s_h, s_w = padded.stride()
    windows = padded.as_strided((n, 2 * padding + 1, 2 * padding + 1, c, h, w), (s_n, s_h, s_w, s_c, s_h, s_w))
    return windows[torch.arange(n, device=images.device), offsets[:, 0], offsets[:, 1]]


def horizontal_flip(images: Tensor, mask: Tensor) -> Tensor:
    """Mirrors left-right the samples where ``mask`` (N, bool) is True."""
    chosen = mask.nonzero().squeeze(1)
    return images.index_copy(0, chosen, images.index_select(0, chosen).flip(3))


class InMemoryLoader:
    """Batches of an in-memory data set: ``for images, labels in loader`` like a DataLoader.

    ``images``: uint8 (pixels 0..255, scaled by 1/255 like ``ToTensor``) or floating point (used as they
    are), N x C x H x W; ``labels``: N integers. Both are moved to ``device`` once. Each batch is
    ``(crop/flip(images[idx]) * scale - mean) / std`` as float32 on the device.
    ``generator``: a CPU ``torch.Generator`` to draw from; pass the data module's own generator so that
    its ``set_epoch`` reseeds this loader too. Without ``shuffle`` (evaluation) the order is 0..N-1
    and there is no augmentation.
    Data parallel (``world_size`` > 1, training): every rank draws the same permutation and takes every
    ``world_size``-th position of it from ``rank`` on (padded with its start to a multiple of
    ``world_size``, or cut with ``drop_last``, like ``DistributedSampler``) in batches of
    ``batch_size // world_size``: the union of the ranks' k-th batches is the k-th batch of one process.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        device: torch.device | str = "cpu",
        seed: int = 0,
        generator: torch.Generator | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if images.dim() != 4:
            raise ConfigError(f"in-memory images must be N x C x H x W, got shape {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ConfigError(f"{labels.shape[0]} labels for {images.shape[0]} images")
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()
        self.labels = labels.to(self.device, dtype=torch.int64)
        self.rank, self.world_size = int(rank), check_positive_int("world_size", world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {rank} is not allowed with world_size {world_size}")
        if batch_size % self.world_size:
            raise ConfigError(
                f"dataset.batch_size={batch_size} is not allowed with {world_size} processes: "
                "the global batch must divide evenly"
            )
        self.batch_size = check_positive_int("dataset.batch_size", batch_size // self.world_size)  # per rank
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.crop_padding = int(crop_padding)
        if self.crop_padding < 0:
            raise ConfigError(f"crop padding {crop_padding!r} is not allowed: it must be >= 0")
        self.flip = bool(flip)
        channels = images.shape[1]
        self.scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        inv_std = 1.0 / self._per_channel(std, 1.0, channels)
        # (x * scale - mean) / std = x * (scale / std) - mean / std: one multiply and one subtract, in place
        self.mul, self.sub = self.scale * inv_std, self._per_channel(mean, 0.0, channels) * inv_std
        self.seed = int(seed)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(epoch_seed(seed, 0))

    def _per_channel(self, values, default: float, channels: int) -> Tensor:
        values = [default] * channels if values is None else list(values)
        if len(values) != channels:
            raise ConfigError(f"{len(values)} normalisation values for {channels} channels")
        return torch.tensor(values, dtype=torch.float32, device=self.device).view(1, channels, 1, 1)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        n, world = self.images.shape[0], self.world_size
        return n // world if self.drop_last else -(-n // world)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the generator as (seed, epoch): the next iteration is a function of those alone."""
        self.generator.manual_seed(epoch_seed(self.seed, epoch))

    def epoch_plan(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(order, crop offsets, flip mask) of this rank's next epoch, drawn on the CPU (the same draws on every
        rank) and moved to the device once."""
        n = self.images.shape[0]
        if not self.shuffle:
            return torch.arange(n, device=self.device), None, None
        order = torch.randperm(n, generator=self.generator)
        offsets = (
            torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=self.generator) if self.crop_padding else None
        )
        flips = torch.rand(n, generator=self.generator) < 0.5 if self.flip else None

        def mine(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if self.world_size > 1:  # this rank's positions of the (padded or cut) permutation
                total = self.num_samples * self.world_size
                t = torch.cat([t] * -(-total // n))[:total][self.rank :: self.world_size]
            return t.to(self.device, non_blocking=True)

        return mine(order), mine(offsets), mine(flips)

    def normalize(self, images: Tensor) -> Tensor:
        """float32 ``(images * scale - mean) / std``."""
        return images.to(torch.float32, copy=True).mul_(self.mul).sub_(self.sub)  # never the stored tensor

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order, offsets, flips = self.epoch_plan()
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            idx = order[sl]
            images = self.images[idx]
            if offsets is not None:
                images = random_crop(images, self.crop_padding, offsets[sl])
            if flips is not None:
                images = horizontal_flip(images, flips[sl])
            yield self.normalize(images), self.labels[idx]


SPLITS = ("train", "val", "test")


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor, bool]:
    """(images, labels, raw): a ``TensorDataset`` as it is (raw False: already normalised), a torchvision set's
    uint8 pixels (raw True), a ``Subset`` (the held-out split) as those rows of its data set."""
    if isinstance(dataset, Subset):
        images, labels, raw = dataset_tensors(dataset.dataset)
        rows = torch.as_tensor(np.asarray(dataset.indices), dtype=torch.int64)
        return images[rows], labels[rows], raw
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0], dataset.tensors[1], False
    return *to_uint8_tensors(dataset), True


def split_tensors(data, split: str) -> tuple[Tensor, Tensor, tuple | None, tuple | None]:
    """(images, labels, mean, std) of one split (train, val or test) of a data module: torchvision sets give
    uint8 pixels normalised by the module's mean/std; a ``TensorDataset`` (digits) is already normalised."""
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not allowed: it must be one of {', '.join(SPLITS)}")
    if data.train_set is None:
        data.setup()
    images, labels, raw = dataset_tensors(getattr(data, f"{split}_set"))
    return (images, labels, tuple(data.mean), tuple(data.std)) if raw else (images, labels, None, None)


def in_memory_loader(data, split: str, device: torch.device | str) -> InMemoryLoader:
    """The in-memory loader of one split (train, val or test) of a ``ClassificationData`` (digits, MNIST, CIFAR).

    The training loader shares the module's generator, so ``data.set_epoch(epoch)`` reseeds it exactly as
    it reseeds the DataLoader path; augmentation follows ``data.augment`` and ``data.augmentation()``.
    """
    images, labels, mean, std = split_tensors(data, split)
    train = split == "train"
    padding, flip = 0, False
    if train and getattr(data, "augment", False) and hasattr(data, "augmentation"):
        padding, flip = augmentation_params(data.augmentation())
    loader = InMemoryLoader(
        images,
        labels,
        data.batch_size if train else data.eval_batch_size,
        shuffle=train,
        drop_last=data.drop_last and train,
        mean=mean,
        std=std,
        crop_padding=padding,
        flip=flip,
        device=device,
        seed=data.seed,
        generator=data._generator if train else None,
        rank=getattr(data, "rank", 0) if train else 0,
        world_size=getattr(data, "world_size", 1) if train else 1,
    )
    if train and len(loader) == 0:  # as the DataLoader path: a run that would take no optimizer step is refused
        raise no_batches_error(
            images.shape[0], loader.num_samples, loader.batch_size, loader.world_size, loader.drop_last
        )
    return loader
