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
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from marginlab.errors import OutputError

#: how many suffixed names are tried before giving up
MAX_TRIES = 10_000


def output_error(err: OSError, what: str) -> OutputError:
    """One line naming the path and the system's reason (e.g. ``No space left on device (ENOSPC)``)."""
    import errno

    code = f" ({errno.errorcode[err.errno]})" if err.errno in errno.errorcode else ""
    path = err.filename if err.filename is not None else what
    return OutputError(f"cannot write {path}: {err.strerror or err}{code}")


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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", lambda path: claim_dir(path), use_cache=True)
    if not OmegaConf.has_resolver("unique_subdir"):
        OmegaConf.register_new_resolver("unique_subdir", lambda parent, subdir: claim_subdir(parent, subdir))


register_resolvers()
