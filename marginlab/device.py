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
