"""The one error for a training loader with no batches, shared by the loaders of data/base.py and data/in_memory.py
(its own module, so neither imports the other for it)."""

from __future__ import annotations

from marginlab.errors import ConfigError, DataError, MarginlabError


def no_batches_error(images: int, share: int, batch: int, world_size: int, drop_last: bool) -> MarginlabError:
    """The error for a training loader with zero batches: the numbers and the fix."""
    if images == 0:
        return DataError("the training set has no images: nothing to train on")
    where = f"{share} per process on {world_size} processes, " if world_size > 1 else ""
    return ConfigError(
        f"dataset.batch_size={batch * world_size} gives 0 training batches with "
        f"dataset.drop_last={str(drop_last).lower()}: the training set has {images} images "
        f"({where}fewer than one batch of {batch}{' per process' if world_size > 1 else ''}), "
        f"so no optimizer step would be taken. To fix: set dataset.batch_size to at most "
        f"{share * world_size}, or dataset.drop_last=false"
    )
