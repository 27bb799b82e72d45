"""Checkpoints: written atomically (temp file + rename), found again for ``resume=``."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from marginlab.errors import ConfigError

CHECKPOINT_DIR = "checkpoints"


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename: a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_run_dir(resume: str, outputs_root: str | os.PathLike) -> Path:
    """``latest`` (newest run under <outputs>/runs), a run directory, or a checkpoint file inside one."""
    if resume == "latest":
        runs = sorted((p for p in (Path(outputs_root) / "runs").glob("*") if (p / CHECKPOINT_DIR / "last.pt").is_file()),
                      key=lambda p: (p / CHECKPOINT_DIR / "last.pt").stat().st_mtime)
        if not runs:
            raise ConfigError(f"resume=latest: no run with a checkpoint under {Path(outputs_root) / 'runs'}")
        return runs[-1].resolve()
    path = Path(resume).expanduser()
    if path.is_file() and path.suffix == ".pt":
        run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent
    elif path.is_dir():
        run_dir = path
    else:
        raise ConfigError(f"resume={resume!r} is not allowed: give a run directory, a checkpoint .pt file, or latest")
    if not (run_dir / ".hydra" / "overrides.yaml").is_file():
        raise ConfigError(f"resume={resume!r}: {run_dir} is not a marginlab run directory (no .hydra/overrides.yaml)")
    return run_dir.resolve()


def resume_checkpoint(resume: str, run_dir: Path) -> Path:
    """The checkpoint file to load: the one named, else <run dir>/checkpoints/last.pt."""
    path = Path(resume).expanduser()
    ckpt = path if path.is_file() else run_dir / CHECKPOINT_DIR / "last.pt"
    if not ckpt.is_file():
        raise ConfigError(f"resume={resume!r}: no checkpoint at {ckpt}")
    return ckpt
