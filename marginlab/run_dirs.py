"""Run and sweep-job directories that no other run can share: each is created exclusively (``os.mkdir``).

Two ``marginlab train`` started in the same second, or two multiruns sharing one ``hydra.sweep.dir``, would
otherwise write into one directory. train.yaml names its directories through two resolvers:

* ``${unique_dir:<path>}`` (``hydra.run.dir``, ``hydra.sweep.dir``) creates ``<path>``, or ``<path>-1``,
  ``<path>-2``, ... when it exists, and returns the one created. Cached (use_cache): Hydra resolves the value
  once per config, and copies that cache into every job of a sweep, so a sweep claims its directory once.
  An explicit ``hydra.run.dir=`` / ``hydra.sweep.dir=`` replaces the resolver: ``resume=`` continues in the
  run's own directory, and several multiruns may share one sweep directory on purpose.
* ``${unique_subdir:<sweep dir>,<subdir>}`` (``hydra.sweep.subdir``) claims ``<sweep dir>/<subdir>`` the same
  way and returns the subdir (``.../seed=0-1`` when taken). Not cached: Hydra resolves it once per job.
* ``${claimed_subdir:<job dir>,.hydra}`` (``hydra.output_subdir``) creates the job's ``.hydra/`` exclusively, after
  the config composed and before Hydra writes into it: an explicit ``hydra.run.dir=`` naming a directory that
  already holds a run (or two runs started with the same one) is refused, never written over. ``resume=`` sets
  ``hydra.output_subdir=null`` (it continues in its own directory).
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from marginlab.errors import OutputError
from marginlab.file_lock import FileLock

#: how many suffixed names are tried before giving up
MAX_TRIES = 10_000


#: torch's zip writer failing because the file system refused a write (a full disk, ``ulimit -f``): it raises
#: ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 3350``, the OSError (when a
#: Python file raised one) in its ``__context__``
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def system_cause(err: BaseException) -> BaseException | None:
    """The file system's refusal behind ``err``: ``err`` itself when it is an OSError with an errno; for torch's
    wrapped form the OSError in its cause/context chain, else the RuntimeError itself; None when not one."""
    if isinstance(err, OSError) and err.errno is not None:
        return err
    text = str(err)
    if not (
        isinstance(err, RuntimeError) and "inline_container.cc" in text and any(m in text for m in TORCH_WRITE_FAILURES)
    ):
        return None
    seen, inner = {id(err)}, err.__cause__ or err.__context__
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, OSError) and inner.errno is not None:
            return inner
        seen.add(id(inner))
        inner = inner.__cause__ or inner.__context__
    return err


def system_reason(err: BaseException) -> str:
    """The system's reason for ``system_cause(err)``: ``No space left on device (ENOSPC)``, or torch's words."""
    import errno

    cause = system_cause(err) or err
    if isinstance(cause, OSError):
        code = f" ({errno.errorcode[cause.errno]})" if cause.errno in errno.errorcode else ""
        return f"{cause.strerror or cause}{code}"
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"the write failed, no reason given by the system (torch: {first})"


def output_error(err: BaseException, what: str) -> OutputError:
    """One line naming the path and the system's reason (e.g. ``No space left on device (ENOSPC)``)."""
    filename = getattr(system_cause(err), "filename", None)
    return OutputError(f"cannot write {filename if filename is not None else what}: {system_reason(err)}")


def claim_dir(path: str | os.PathLike) -> str:
    """Creates ``path`` (else ``path-1``, ``path-2``, ...) with ``os.mkdir``; returns the one this call owns."""
    base = Path(path)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, str(base.parent)) from None
    for n in range(MAX_TRIES):
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        except OSError as err:
            raise output_error(err, str(candidate)) from None
        return str(candidate)
    raise OutputError(f"cannot create a directory {base}: {base}-1 ... {base}-{MAX_TRIES - 1} all exist")


def claim_subdir(parent: str | os.PathLike, subdir: str) -> str:
    """Claims ``parent/subdir`` as ``claim_dir`` does; returns the claimed path relative to ``parent``."""
    return os.path.relpath(claim_dir(Path(parent) / subdir), parent)


def claim_output_subdir(run_dir: str | os.PathLike, subdir: str) -> str:
    """Creates ``run_dir/subdir`` (``.hydra``) with ``os.mkdir`` and returns ``subdir``: an OutputError when it
    exists, i.e. when ``run_dir`` already holds a run (or one starting now) whose files the new run would replace."""
    target = Path(run_dir) / subdir
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        os.mkdir(target)
    except FileExistsError:
        raise OutputError(
            f"hydra.run.dir={run_dir} already holds a run ({target} exists); a new run never writes into "
            f"another's directory: give a new directory, or resume={run_dir} to continue that run"
        ) from None
    except OSError as err:
        raise output_error(err, str(target)) from None
    return subdir


#: the file a training process locks in its run directory (marginlab/training/train.py holds it while it trains)
LOCK_FILE = ".training.lock"


class RunLock(FileLock):
    """The lock (``FileLock``) a process holds on a run directory while it trains there: a second process training
    the same run (``resume=latest`` of a run still running, one resume started twice) is refused instead of
    interleaving its checkpoints and records with the first's. A killed run never blocks its own resume."""

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__(Path(run_dir) / LOCK_FILE)
        try:
            taken = self.acquire()
        except OSError as err:
            raise output_error(err, str(self.path)) from None
        if not taken:
            raise OutputError(
                f"{run_dir} is being trained by another process now (it holds {self.path}): wait for it to end, "
                f"or stop it, then resume"
            )


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", lambda path: claim_dir(path), use_cache=True)
    if not OmegaConf.has_resolver("unique_subdir"):
        OmegaConf.register_new_resolver("unique_subdir", lambda parent, subdir: claim_subdir(parent, subdir))
    if not OmegaConf.has_resolver("claimed_subdir"):  # cached: Hydra reads hydra.output_subdir twice per job
        OmegaConf.register_new_resolver("claimed_subdir", claim_output_subdir, use_cache=True)


register_resolvers()
