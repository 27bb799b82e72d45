"""Which torch device a run, an evaluation or an embedding uses (``auto``: CUDA when there is one)."""

from __future__ import annotations

import torch

from marginlab.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=cpu or auto")
    return torch.device(name)


def training_device(kind: str, index: int | None) -> torch.device:
    """The device of ``trainer.device`` (auto | cpu | cuda, an enum of the schema) and ``trainer.device_index``
    (which GPU; null: the current one). validate.py has already refused an index without ``cuda``."""
    device = resolve_device(kind)
    if index is None:
        return device
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(
            f"trainer.device_index={index} is not allowed: this machine has {count} GPU(s), so choose 0 to "
            f"{count - 1}, or leave it null for the current one"
        )
    return torch.device("cuda", index)
