"""Checkpoints, the one module that owns their format: what one holds (``checkpoint_payload``, the loop's
``LoopState`` among it), how it is written (atomically: temp file + rename), read (``torch.load(weights_only=True)``
only: a checkpoint holds tensors and plain containers; reading one never runs code), restored into a training job
(``load_training_state``) and found again (``find_checkpoint`` for eval/export/init_from, ``find_run_dir`` and
``resume_checkpoint`` for ``resume=``)."""

from __future__ import annotations

import json
import os
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from marginlab.errors import ConfigError, DataError, OutputError
from marginlab.files import replace_file, replace_text
from marginlab.run_dirs import system_cause, system_reason

if TYPE_CHECKING:
    from marginlab.training.engine import LoopState

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAMES = ("last.pt", "best.pt")
#: what ``resume=`` needs; ``marginlab eval`` needs only EVAL_KEYS
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "state", "rng", "config")
EVAL_KEYS = ("model", "config", "data")
try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

#: the only globals a checkpoint may name, allowed by name: numpy's array reconstruction (under numpy 1's and 2's
#: module names), which checkpoints written before the plain format need (np.random.get_state()'s ndarray)
LEGACY_GLOBALS = [
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
]


# ---------------------------------------------------------------- the format
def checkpoint_payload(
    model_state: dict,
    optimizer_state: dict,
    scheduler,
    scaler,
    state: LoopState,
    config,
    data,
    extras: dict | None = None,
) -> dict:
    """What ``last.pt``/``best.pt`` hold; model and optimizer state in the unsharded layout (sharded_state.py).

    ``config``: the run's DictConfig (saved resolved); ``data``: the data module (what ``marginlab eval`` needs to
    rebuild the backbone); ``extras``: the loss's own entries (``criterion.checkpoint_entries()``)."""
    from omegaconf import OmegaConf

    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "state": vars(state).copy(),
        "rng": rng_state(),
        "config": OmegaConf.to_container(config, resolve=True, enum_to_str=True),  # plain strings: weights_only loads
        "data": {"in_channels": data.in_channels, "image_size": data.image_size, "num_classes": data.num_classes},
        **(extras or {}),
    }


# ---------------------------------------------------------------- writing
def temp_files(ckpt_dir: Path, names=CHECKPOINT_NAMES) -> list[Path]:
    """The temp files an interrupted ``save_atomic`` left in ``ckpt_dir`` (``.last.pt.*``, ``.best.pt.*``)."""
    return sorted(p for name in names for p in Path(ckpt_dir).glob(f".{name}.*"))


def remove_temp_files(ckpt_dir: Path, names=CHECKPOINT_NAMES) -> None:
    for tmp in temp_files(ckpt_dir, names):
        tmp.unlink(missing_ok=True)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save through a temp file in the same directory, synced, renamed, the directory synced
    (files.py): a crash never leaves a half file. A killed save's leftovers go first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temp_files(path.parent, (path.name,))
    try:
        replace_file(path, lambda f: torch.save(obj, f), binary=True)  # a failed write removes its temp file
    except Exception as err:
        if system_cause(err) is None:
            raise
        raise OutputError(f"cannot write {path}: {system_reason(err)}; {kept_checkpoint(path.parent)}") from err


def kept_checkpoint(ckpt_dir: Path) -> str:
    """What a failed save leaves to resume from: the last.pt of an earlier epoch, untouched."""
    last = ckpt_dir / "last.pt"
    if not last.is_file():
        return "no earlier checkpoint of this run exists"
    resume = f": resume={ckpt_dir.parent} continues from it" if ckpt_dir.name == CHECKPOINT_DIR else ""
    return f"{last} of an earlier epoch is kept{resume}"


def save_checkpoints(payload: dict, ckpt_dir: Path, is_best: bool) -> Path:
    """``best.pt`` first (when this epoch is the best), then ``last.pt``: a kill in between redoes this epoch."""
    if is_best:
        save_atomic(payload, ckpt_dir / "best.pt")
    save_atomic(payload, ckpt_dir / "last.pt")
    return ckpt_dir / "last.pt"


# ---------------------------------------------------------------- reading
def _why_unreadable(path: Path, exc: Exception) -> str:
    """One line on why torch.load refused ``path``."""
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    text = str(exc)
    if "Weights only load failed" in text or "WeightsUnpickler error:" in text:
        return f"refused as unsafe: {_unsafe_content(text)}; nothing was run"
    if "PytorchStreamReader" in text or isinstance(exc, EOFError):
        return "the file is truncated or corrupted (not a complete torch.save archive)"
    first = (text.strip().splitlines() or [""])[0]
    return f"not a torch.save file ({type(exc).__name__}: {first[:200]})"


#: the parts of torch's refusal that advise loading the file anyway (weights_only=False, an allow-list) or filing an
#: issue: never repeated for a file that may be hostile
TORCH_ADVICE = (
    "weights_only",
    "weights only load failed",
    "pytorch 2.6",
    "trusted source",
    "file an issue",
    "check the",
)


def _unsafe_content(text: str) -> str:
    """What torch's weights-only unpickler refused in ``text``, without its advice."""
    forbidden = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if forbidden:
        return f"it asks for {forbidden.group(1)}, which a checkpoint may not hold"
    blocked = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
    if blocked:
        return f"it asks for {blocked.group(1)} (module {blocked.group(2)} is blocked), which a checkpoint may not hold"
    text = text.split("WeightsUnpickler error:", 1)[-1]
    sentences = (s.strip(" .`") for line in text.splitlines() for s in line.split(". "))
    detail = next((s for s in sentences if s and not any(a in s.lower() for a in TORCH_ADVICE)), "")
    detail = f" ({detail.replace('``', '')})" if detail else ""
    return f"it holds more than tensors and plain containers{detail}"


def read_checkpoint(path: Path, required=EVAL_KEYS, map_location="cpu", mmap: bool = False) -> dict:
    """The one way marginlab reads a checkpoint (resume and eval): ``torch.load(weights_only=True)``, numpy's
    array reconstruction allowed by name for old checkpoints. A DataError naming the file when it cannot."""
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch maps only its zip format; a legacy (pre-1.6) file is read whole
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(LEGACY_GLOBALS):
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error says what matters
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: a directory, not a checkpoint file") from None
    except Exception as exc:  # weights_only: nothing ran, whatever the file held
        raise DataError(f"{path}: not a loadable checkpoint: {_why_unreadable(path, exc)}") from None
    bad = _bad_tensor(ckpt)
    if bad:  # e.g. a view declaring more elements than the file stores: a memory bomb for whoever copies it
        raise DataError(f"{path}: not a loadable checkpoint: {bad}; nothing was run")
    missing = [k for k in required if k not in ckpt] if isinstance(ckpt, dict) else list(required)
    if missing:
        raise DataError(f"{path}: not a marginlab checkpoint (no {', '.join(repr(k) for k in missing)} entries)")
    return ckpt


def _bad_tensor(obj) -> str | None:
    """The first tensor in ``obj`` (dicts, lists, tuples; walked without recursion) that is not a dense tensor whose
    elements are all in the file (sparse: unchecked indices; meta: no data; a view declaring more bytes than its
    storage holds), described; None when every tensor is."""
    stack = [("", obj)]
    while stack:
        where, node = stack.pop()
        if torch.is_tensor(node):
            if node.layout != torch.strided or node.device.type == "meta":
                kind = node.device.type if node.layout == torch.strided else node.layout
                return f"tensor {where or '(top level)'} is a {kind} tensor; a checkpoint holds dense tensors with data"
            declared, stored = node.numel() * node.element_size(), node.untyped_storage().nbytes()
            if declared > stored:
                shape = list(node.shape)
                return (
                    f"tensor {where or '(top level)'} declares {shape} ({declared} bytes), its storage holds {stored}"
                )
        elif isinstance(node, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
    return None


def state_differences(expected: dict, saved: dict) -> list[str]:
    """Every way ``saved`` (key -> tensor) misses a model whose state has the shapes ``expected`` (key -> shape)."""
    shape = lambda v: list(v.shape) if torch.is_tensor(v) else type(v).__name__  # noqa: E731
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    lines = [f"missing keys ({len(missing)}): {', '.join(missing)}"] if missing else []
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    lines += [
        f"{k}: saved {shape(v)}, model {list(expected[k])}"
        for k, v in saved.items()
        if k in expected and shape(v) != list(expected[k])
    ]
    return lines


def load_training_state(
    path: Path, model, optimizer, scheduler, scaler, criterion=None, map_location="cpu"
) -> LoopState:
    """Restores a ``resume=`` checkpoint into a freshly built job (model, optimizer, schedule, GradScaler, random
    generators, the loss's own entries); returns its LoopState. A ConfigError listing every difference when the
    checkpoint's weights do not fit ``model``."""
    from marginlab.distributed import sharded_state  # the layout of a Partial FC shard
    from marginlab.training.engine import LoopState  # the loop's state: only a job that trains needs the loop

    ckpt = read_checkpoint(path, RESUME_KEYS, map_location=map_location)
    saved_head = ckpt["config"]["head"]["_target_"]
    differences = state_differences(sharded_state.unsharded_shapes(model), ckpt["model"])
    if differences:
        raise ConfigError(
            f"resume: {path} does not fit this model (it was trained with {saved_head}):\n  " + "\n  ".join(differences)
        )
    sharded_state.load_model_state_dict(model, ckpt["model"])
    sharded_state.load_optimizer_state_dict(optimizer, model, ckpt["optimizer"])
    # the schedule is the config's (a longer run is checked in resume.py), not the saved callable's attributes
    scheduler.load_state_dict({**ckpt["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state = LoopState(**ckpt["state"])
    if criterion is not None:
        criterion.restore_checkpoint_entries(ckpt, state.step)
    return state


# ---------------------------------------------------------------- random state
def rng_state() -> dict:
    """Every generator's state as tensors and plain lists: what ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved):
    """``np.random.set_state``'s tuple from ``rng_state()``'s dict (or an old checkpoint's tuple, as it is)."""
    if not isinstance(saved, dict):
        return saved
    return (
        saved["bit_generator"],
        saved["key"].cpu().numpy().astype(np.uint32),
        saved["pos"],
        saved["has_gauss"],
        saved["cached_gaussian"],
    )


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------- finding
def find_checkpoint(value, key: str = "checkpoint") -> Path:
    """A checkpoint file as given, or a run directory's ``checkpoints/best.pt`` (else ``last.pt``)."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / CHECKPOINT_DIR / name).is_file():
                return path / CHECKPOINT_DIR / name
        raise ConfigError(f"{key}={value!r}: no {CHECKPOINT_DIR}/best.pt or last.pt in that run directory")
    if not path.is_file():
        raise ConfigError(f"{key}={value!r} is not allowed: give a checkpoint .pt file or a run directory")
    return path


def find_run_dir(resume: str, outputs_root: str | os.PathLike) -> Path:
    """``latest`` (newest run under <outputs>/runs), a run directory, or a checkpoint file inside one."""
    if resume == "latest":
        runs = sorted(
            (p for p in (Path(outputs_root) / "runs").glob("*") if (p / CHECKPOINT_DIR / "last.pt").is_file()),
            key=lambda p: (p / CHECKPOINT_DIR / "last.pt").stat().st_mtime,
        )
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


def trim_epoch_records(path: Path, epoch: int) -> None:
    """Drops the records of ``metrics.jsonl`` past ``epoch`` (written before a kill, ahead of the checkpoint
    the run resumes from; the resumed run writes them again). Rewritten atomically, only when needed."""
    if not path.is_file():
        return
    lines = read = path.read_text().splitlines(keepends=True)
    if lines and not _is_record(lines[-1]):
        lines = lines[:-1]  # a kill while appending leaves a partial last line; the resumed run writes it again
    bad = next((n for n, line in enumerate(lines, 1) if line.strip() and not _is_record(line)), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad} is not a JSON epoch record; repair or remove it to resume")
    kept = [line for line in lines if line.strip() and json.loads(line).get("epoch", 0) <= epoch]
    if len(kept) == len(read):
        return
    replace_text(path, "".join(kept))


def _is_record(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def prepare_resumed_run(run_dir: Path, epoch: int) -> None:
    """Where training restarts from a checkpoint of ``epoch``: no temp file of a killed save, no record ahead, no
    summary of an earlier invocation (a kill now must not leave its "completed" as this run's result)."""
    remove_temp_files(run_dir / CHECKPOINT_DIR)
    trim_epoch_records(run_dir / "metrics.jsonl", epoch)
    (run_dir / "metrics.json").unlink(missing_ok=True)  # the resumed run writes its own when it ends


def finite_weights_note(saved: tuple[Path, int] | None) -> str:
    """Where the last finite weights are: the last checkpoint written (or resumed from) and its epoch."""
    if saved is None:
        return "no checkpoint of this run holds finite weights (none was written)"
    return f"the last finite weights are in {saved[0]} (epoch {saved[1]})"
