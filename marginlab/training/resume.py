"""``resume=<run dir | checkpoint | latest>``: rerun Hydra with the run's own overrides, in the run's own directory.

Everything a resume could refuse is checked here, before Hydra starts and before any file of the run is touched
(``check_resume``): the config composes and validates, nothing that changes the model, the loss or the data differs
from the checkpoint's config (``RESUMABLE`` lists what may change), and a longer ``trainer.epochs`` leaves the
learning rate of every step already taken as it was. A completed run is left alone (``expand_resume`` returns
None). The run's original ``.hydra/overrides.yaml`` is never rewritten: each resume that starts training appends its
overrides to ``.hydra/resumes.yaml`` (``record_resume``), and the next resume starts from the newest entry.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from marginlab.errors import ConfigError
from marginlab.files import replace_text
from marginlab.replayed_overrides import read_history_file, read_override_file
from marginlab.training.checkpoint import find_run_dir, resume_checkpoint

HISTORY_FILE = "resumes.yaml"
THREADS = "trainer.num_threads"  # float results depend on it: a resume keeps the run's (inherit_threads)
EPOCHS = "trainer.epochs"  # a resume keeps the run's unless it names one (inherit_epochs)

#: per-invocation settings that a resumed run does not inherit from the original command line
NOT_INHERITED = ("resume", "trainer.stop_after_epoch")

#: config keys (and key prefixes, ending in ".") that may differ from the checkpoint's config on resume: how long
#: and where the run goes on, how it is logged and evaluated; nothing that changes the model, the loss or the data
#: (init_from: a resume continues from its own checkpoint, so it neither needs nor re-applies it)
RESUMABLE = (
    "resume",
    "init_from",
    "init_from_head",
    "name",
    "head.init",  # head.init: the weights come from the checkpoint
    "trainer.epochs",
    "trainer.stop_after_epoch",
    "trainer.device",
    "trainer.device_index",
    "trainer.precision",
    "trainer.compile",
    "trainer.channels_last",
    "trainer.eval_every_n_epochs",
    "trainer.checkpoint",
    "trainer.max_nonfinite_steps",
    "trainer.deterministic",
    "trainer.strict_margin",
    "logger.",
    "verification",
    "verification.",
    "dataset.num_workers",
    "dataset.pin_memory",
    "dataset.eval_batch_size",
    "dataset.root",
    "dataset.decode",  # who decodes face JPEGs: pil and cpu give the same pixels, cuda nvJPEG's
    "reproduce",
    "reproduce.",
)  # how the experiment's table is run, not this run's model or data

#: keys added after checkpoints were first written, with the value that reproduces a checkpoint saved without them
#: (no validation split, best.pt chosen on test, the class count from the data); resuming such a run with other
#: values is refused like any other change, and the message names the value to pass
ADDED_LATER = {
    "dataset.val_fraction": 0.0,
    "dataset.num_classes": None,
    "trainer.best_on": "test",
    "trainer.num_threads": None,  # torch's own count, as before the key existed
    "trainer.freeze_batchnorm": "none",  # BatchNorm trained as usual, as before the key existed
}
#: ``_target_`` prefixes a later version moved (old -> new): a checkpoint written before the move still resumes
MOVED_TARGETS = {"marginlab.schedules.": "marginlab.training.schedules."}  # issue #26: the training/ package


def upgraded_overrides(overrides: list[str]) -> list[str]:
    """A run's saved overrides in today's spelling: ``trainer.device=cuda:N`` (before the device kind became an
    enum, issue #26) is ``trainer.device=cuda`` and ``trainer.device_index=N``."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        gpu = re.fullmatch(r"cuda:(\d+)", value) if override_key(o) == "trainer.device" else None
        out += [f"{key}=cuda", f"trainer.device_index={gpu[1]}"] if gpu else [o]
    return out


def outputs_root() -> Path:
    return Path(os.environ.get("MARGINLAB_OUTPUT_DIR", "outputs"))


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def previous_overrides(run_dir: Path) -> list[str]:
    """The overrides the run last trained with: the newest resume's, else the original command line's; each
    checked as untrusted input (marginlab/replayed_overrides.py) before anything replays it."""
    history = read_history(run_dir)
    return upgraded_overrides(list(history[-1]["overrides"]) if history else original_overrides(run_dir))


def original_overrides(run_dir: Path) -> list[str]:
    """The run's original command line (Hydra's ``.hydra/overrides.yaml``), checked as untrusted input."""
    return read_override_file(run_dir / ".hydra" / "overrides.yaml")


def read_history(run_dir: Path) -> list[dict]:
    """The run's resumes, oldest first, every override checked; a ConfigError naming the file and the line when
    it is not a list of such entries or holds an override a run cannot have."""
    path = run_dir / ".hydra" / HISTORY_FILE
    return read_history_file(path) if path.is_file() else []


def record_resume(run_dir: Path, overrides: list[str], from_epoch: int) -> None:
    """Appends one resume (when, from which epoch, with which overrides) to ``.hydra/resumes.yaml``. The thread
    count a resume inherits (``inherit_threads``) is the run's own, not a setting: it is left out unless the
    original command line set it (the report labels a job by these overrides and notes what changed)."""
    if not any(override_key(o) == THREADS for o in original_overrides(run_dir)):
        overrides = [o for o in overrides if override_key(o) != THREADS]
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_epoch": from_epoch, "overrides": list(overrides)}
    path = run_dir / ".hydra" / HISTORY_FILE
    # a kill while writing leaves the history as it was, never half an entry
    replace_text(path, (path.read_text() if path.is_file() else "") + yaml.safe_dump([entry], sort_keys=False))


def merge_overrides(base: list[str], new: list[str]) -> list[str]:
    """``base`` then ``new``, one entry per key (the later wins), without the per-invocation keys of ``base``;
    a new ``trainer.device`` replaces the run's GPU choice too (``resume=X trainer.device=cpu`` after cuda:1)."""
    named = {override_key(o) for o in new}
    dropped = {*NOT_INHERITED, *(["trainer.device_index"] if "trainer.device" in named else [])}
    merged: dict[str, str] = {}
    for o in [o for o in base if override_key(o) not in dropped] + new:
        if override_key(o) != "resume":
            merged[override_key(o)] = o
    return list(merged.values())


def expand_resume(overrides: list[str]) -> list[str] | None:
    """Replaces ``resume=X`` by the run's last overrides + the new ones (later wins) + its run dir, after
    ``check_resume``; None when the run has nothing left to do (the reason is printed)."""
    given = [o for o in overrides if override_key(o) == "resume"]
    if not given:
        return overrides
    value = given[-1].split("=", 1)[1]
    if value in ("", "null"):
        return [o for o in overrides if override_key(o) != "resume"]
    run_dir = find_run_dir(value, outputs_root())
    ckpt = resume_checkpoint(value, run_dir)
    check_not_behind(ckpt, run_dir)
    merged = merge_overrides(previous_overrides(run_dir), overrides)
    done, merged = check_resume(merged, ckpt)
    if done:
        print(f"marginlab: {done}; {run_dir} is unchanged")
        return None
    # hydra.output_subdir=null: Hydra does not rewrite the run's .hydra/ files (train() records the resume)
    return merged + [f"resume={ckpt}", f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


# ---------------------------------------------------------------- the checks
def check_not_behind(ckpt: Path, run_dir: Path) -> None:
    """A resume from a checkpoint of the run (``best.pt``) behind its ``last.pt`` would train again, and overwrite,
    the epochs ``last.pt`` holds: refused. An unreadable ``last.pt`` (resuming from ``best.pt`` to recover) is not."""
    from marginlab.errors import DataError
    from marginlab.training.checkpoint import CHECKPOINT_DIR, read_checkpoint

    last = run_dir / CHECKPOINT_DIR / "last.pt"
    if not last.is_file() or last.resolve() == ckpt.resolve():
        return
    try:
        ahead, chosen = (int(read_checkpoint(p, ("state",), mmap=True)["state"]["epoch"]) for p in (last, ckpt))
    except (DataError, KeyError, TypeError, ValueError):
        return  # check_resume reports a bad checkpoint; a bad last.pt is why one resumes from another
    if ahead > chosen:
        raise ConfigError(
            f"resume={ckpt}: the run's {last} is at epoch {ahead}, ahead of this checkpoint's {chosen}; resuming "
            f"from it would train epochs {chosen + 1}-{ahead} again over them: resume={run_dir} continues from "
            f"last.pt, init_from={ckpt} starts a new run from its weights"
        )


def compose_train_config(overrides: list[str]):
    """The validated config ``marginlab train <overrides>`` would run with (hydra.* overrides left out)."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import marginlab.config  # noqa: F401  (the schema and resolvers)
    from marginlab.config.validate import validate

    try:
        with initialize_config_module("marginlab.configs", version_base="1.3"):
            cfg = compose("train", overrides=[o for o in overrides if not override_key(o).startswith("hydra.")])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"resume: {str(exc).strip().splitlines()[0]}") from None
    except AssertionError:  # OmegaConf's, for a key under a null node: logger.wandb.* without logger=wandb
        from marginlab.logging.tracker_options import unchosen_tracker

        error = unchosen_tracker(overrides)
        if error is None:
            raise
        raise error from None
    validate(cfg)  # also writes the top-level m / s into cfg.head
    return cfg


def check_resume(overrides: list[str], ckpt_path: Path) -> tuple[str | None, list[str]]:
    """Raises ConfigError when resuming with ``overrides`` would fail or change what the run is; returns (a message
    when the run is already complete (nothing to do), else None; the overrides with what the run inherits)."""
    from marginlab.training.checkpoint import RESUME_KEYS, read_checkpoint

    cfg = compose_train_config(overrides)
    ckpt = read_checkpoint(ckpt_path, RESUME_KEYS, mmap=True)  # mmap: the weights are not read here
    overrides = inherit_epochs(cfg, inherit_threads(cfg, overrides, ckpt["config"]), ckpt["config"])
    return check_resume_config(cfg, ckpt_path, ckpt), overrides


def recheck_resume(cfg, run_dir: Path) -> str | None:
    """``check_not_behind`` and ``check_resume`` again, for the config Hydra composed, once the resume holds the
    run's lock: another process may have trained the run between the first check and the lock (two resumes of one
    run). A message when there is nothing left to do, a ConfigError when the resume no longer fits."""
    import copy

    from marginlab.config.validate import validate

    ckpt = Path(cfg.resume)
    check_not_behind(ckpt, run_dir)
    cfg = copy.deepcopy(cfg)  # validate writes the top-level m / s into the head: the run's own cfg stays as it is
    validate(cfg)
    return check_resume_config(cfg, ckpt)


def check_resume_config(cfg, ckpt_path: Path, ckpt: dict | None = None) -> str | None:
    """``check_resume`` of a composed, validated config (``ckpt``: the checkpoint's entries, when already read)."""
    from omegaconf import OmegaConf

    from marginlab.device import training_device
    from marginlab.training.checkpoint import RESUME_KEYS, read_checkpoint
    from marginlab.training.precision import Precision

    device = training_device(str(cfg.trainer.device), cfg.trainer.get("device_index"))
    Precision.from_setting(str(cfg.trainer.precision), device)  # e.g. fp16 without CUDA
    if ckpt is None:
        ckpt = read_checkpoint(ckpt_path, RESUME_KEYS, mmap=True)  # mmap: the weights are not read here
    new = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # as the checkpoint holds it
    changed = config_changes(ckpt["config"], new)
    if changed:
        raise ConfigError(
            f"resume: {ckpt_path} cannot continue with a different model, loss or data; these keys "
            f"differ from the run's config: {'; '.join(changed)}. Resume may change only "
            f"{', '.join(dict.fromkeys(k.rstrip('.') for k in RESUMABLE))}; start a new run for the rest"
        )
    done, epochs = int(ckpt["state"]["epoch"]), int(cfg.trainer.epochs)
    if epochs < done:
        raise ConfigError(f"resume: trainer.epochs={epochs} is not allowed: the run has already done {done} epochs")
    if done == epochs:
        return (
            f"the run has already completed its {done} of {epochs} epochs: nothing to do (raise trainer.epochs "
            f"to train further)"
        )
    stop = cfg.trainer.get("stop_after_epoch")
    if stop is not None and stop <= done:  # it would train nothing and write a summary without its metrics
        raise ConfigError(
            f"resume: trainer.stop_after_epoch={stop} is not allowed: the run has already done {done} epochs "
            f"(give a later epoch, up to trainer.epochs={epochs}, or leave it out)"
        )
    check_schedule_extension(cfg, ckpt, int(ckpt["config"]["trainer"]["epochs"]))
    return None


def inherit_threads(cfg, overrides: list[str], saved: dict) -> list[str]:
    """A resume trains with the run's torch thread count unless it names one (float results depend on the count,
    marginlab/environment.py; a different one is refused like a change of model): ``cfg`` and the overrides get it."""
    threads = (saved.get("trainer") or {}).get("num_threads")
    if threads is None or cfg.trainer.get("num_threads") is not None:
        return overrides
    cfg.trainer.num_threads = threads
    return [*overrides, f"{THREADS}={threads}"]


def inherit_epochs(cfg, overrides: list[str], saved: dict) -> list[str]:
    """A resume keeps the run's length unless it names trainer.epochs: the default it composes to may have changed
    since the run began (a dataset's own epochs, configs/dataset/), and a run must not grow or end by that."""
    epochs = (saved.get("trainer") or {}).get("epochs")
    if epochs is None or epochs == cfg.trainer.epochs or any(override_key(o) == EPOCHS for o in overrides):
        return overrides
    cfg.trainer.epochs = epochs
    return [*overrides, f"{EPOCHS}={epochs}"]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE)


def moved_target(key: str, value: Any) -> Any:
    """``value`` under its new name when ``key`` is a ``_target_`` naming a class that moved (``MOVED_TARGETS``)."""
    if key.endswith("_target_") and isinstance(value, str):
        for old, new in MOVED_TARGETS.items():
            if value.startswith(old):
                return new + value[len(old) :]
    return value


def config_changes(saved: dict, new: dict) -> list[str]:
    """``key: saved -> new`` for every key outside ``RESUMABLE`` whose value differs."""
    a, b = {k: moved_target(k, v) for k, v in flatten(saved).items()}, flatten(new)
    a.update({k: v for k, v in ADDED_LATER.items() if k in b and k not in a})
    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(a.keys() | b.keys())
        if not resumable(k) and a.get(k, "<unset>") != b.get(k, "<unset>")
    ]


def check_schedule_extension(cfg, ckpt: dict, saved_epochs: int) -> None:
    """A run whose ``trainer.epochs`` changes is allowed to go on only if it stays exactly a run of the new length:
    the schedule's factor at every optimizer step already taken must be the same under both lengths."""
    epochs = int(cfg.trainer.epochs)
    if epochs == saved_epochs:
        return
    from hydra.utils import instantiate

    saved = ckpt["scheduler"]["lr_lambdas"][0] or {}
    steps_per_epoch, taken = int(saved.get("steps_per_epoch", 1)), int(ckpt["scheduler"]["last_epoch"])

    def schedule(n_epochs: int):
        return instantiate(cfg.sched, total_steps=steps_per_epoch * n_epochs, steps_per_epoch=steps_per_epoch)

    old, new = schedule(saved_epochs), schedule(epochs)
    differ = next((s for s in range(taken) if old(s) != new(s)), None)
    if differ is None:
        return
    ended = old(taken) == 0  # the factor the next step would take under the saved length
    raise ConfigError(
        f"resume: trainer.epochs={epochs} is not allowed for this run: its schedule "
        f"({cfg.sched._target_.rpartition('.')[2]}) depends on the run's length, so {epochs} instead of "
        f"{saved_epochs} epochs would change the learning rate of steps already taken (from step {differ})"
        + (" and its schedule has already ended at lr 0" if ended else "")
        + f". To train further, start a new run (a new schedule segment), or resume with trainer.epochs="
        f"{saved_epochs}; a length-independent schedule (sched=constant, or multistep with milestones in epochs) "
        "can be extended on resume"
    )
