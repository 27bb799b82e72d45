"""Which torch device a run, an evaluation or an embedding uses (``auto``: CUDA when there is one)."""

from __future__ import annotations

import re

import torch

from marginlab.errors import ConfigError


def resolve_device(name: str, key: str = "device") -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the ``device=`` of eval and embed; ``key`` names it in errors)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is None:
        raise ConfigError(f"{key}={name!r} is not allowed: choose auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but CUDA is not available here; use {key}=cpu or auto")
    device = torch.device(name)
    return device if device.index is None else gpu(device.index, f"{key}={name!r}")


def training_device(kind: str, index: int | None) -> torch.device:
    """The device of ``trainer.device`` (auto | cpu | cuda, an enum of the schema) and ``trainer.device_index``
    (which GPU; null: the current one). validate.py has already refused an index without ``cuda``."""
    device = resolve_device(kind, key="trainer.device")
    return device if index is None else gpu(index, f"trainer.device_index={index}")


def gpu(index: int, setting: str) -> torch.device:
    """GPU ``index``, when this machine has it (``setting``: the key=value that asked for it, for the error)."""
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(
            f"{setting} is not allowed: this machine has {count} GPU(s), so choose 0 to {count - 1}"
            ", or leave the index out for the current one"
        )
    return torch.device("cuda", index)
