"""How marginlab writes its files (which module uses what: docs/architecture.md).

- Replaced whole or not at all (``replace_file``, ``replace_text``): the new content goes to a temp file beside
  the target, is flushed to disk, renamed over it, and the directory's entry is flushed too. A kill or a power
  loss leaves the old file or the new one, never half of one, and the temp file never stays behind.
- New files only (``check_writable``, ``staged``, ``put_in_place``, ``write_text``): the folder checked before
  the work, each file staged beside the target, put in place when complete, never over an existing file. A
  folder or file that cannot be written is one line naming it and the OS's reason (an OutputError).
- Strict JSON (``dumps``, ``write_json``): a NaN or infinite value is written as ``null`` and named, with what
  it was, under the record's ``"nonfinite"`` key, e.g. ``{"best/test/acc": null, "nonfinite": {"best/test/acc":
  "-inf"}}`` (nested values by their path: ``results.lfw.auc``, ``fpr[3]``); ``restore_nonfinite`` reads it back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from marginlab.errors import OutputError


def fsync_dir(path: str | os.PathLike) -> None:
    """Flushes a directory's entries (a rename into it) to disk; Windows cannot open a directory (a no-op there)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Removes a temp file if it is there; a cleanup that fails (a read-only file system refuses even the unlink
    of a missing file) never replaces the error being raised."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def temp_beside(path: Path) -> Path:
    """A temp name beside ``path`` (the same file system, so the rename is atomic); unique: two writers never
    share one."""
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def replace_file(path: str | os.PathLike, write: Callable[[IO], object], binary: bool = False) -> None:
    """``path`` holds what ``write(f)`` wrote into ``f`` (text, or bytes with ``binary``), atomically and durably
    (see the module doc). The file gets the permissions a plain open() gives (0o666 less the umask)."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        with open(tmp, "xb" if binary else "x") as f:  # x: created here, never an existing file (O_EXCL)
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_dir(path.parent)  # the rename itself on disk: a power loss keeps the new file, not the old


def replace_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text`` afterwards, written atomically and durably (see the module doc)."""
    replace_file(path, lambda f: f.write(text))


#: the errors of a write that are about where it goes, whichever call raised them
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def numbered(path: Path, n: int, suffix: str) -> Path:
    """``best.onnx`` -> ``best-<n>.onnx`` (``suffix`` is kept whole: ``.torchscript.pt``)."""
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.stem
    kept = suffix if suffix and path.name.endswith(suffix) else path.suffix
    return path.with_name(f"{stem}-{n}{kept}")


def free_path(path: Path, suffix: str, companions=()) -> Path:
    """``path`` when it and its companions (``path`` + each companion suffix) are free, else the first free
    ``<stem>-1<suffix>``, ``-2``, ..."""
    candidate, n = path, 0
    while candidate.exists() or any(Path(f"{candidate}{c}").exists() for c in companions):
        n += 1
        candidate = numbered(path, n, suffix)
    return candidate


def exists_error(path: Path, key: str = "out") -> OutputError:
    return OutputError(f"{path} exists; marginlab never overwrites a file: remove it or give another {key}=")


def refuse_existing(*paths: Path, key: str = "out") -> None:
    for path in paths:
        if path.exists():
            raise exists_error(path, key)


def cannot_write(path: Path, exc: OSError, hint: str = "") -> OutputError:
    return OutputError(f"{path}: cannot write there ({exc.strerror or exc}){hint}")


def write_failed(path: Path, reason: OSError | str) -> OutputError:
    """``<path>: cannot write (<reason>)``, the one line for a write the system refused (an OSError: its strerror)."""
    if isinstance(reason, OSError):
        reason = reason.strerror or reason
    return OutputError(f"{path}: cannot write ({reason})")


def _new_file(path: Path) -> None:
    """Creates ``path`` empty (never an existing file: O_EXCL)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def check_writable(folder: Path, hint: str = "") -> None:
    """An OutputError naming ``folder`` (or, when it is still to be made, its first existing parent) and the OS's
    reason unless a file can be created there: called before the expensive work, so that none is lost to it. A
    trial file, not the mode bits: root ignores them, a read-only file system does not."""
    folder = Path(folder).expanduser()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    trial = folder / f".marginlab-write-check.{secrets.token_hex(6)}.tmp"
    try:
        _new_file(trial)
    except OSError as exc:
        raise cannot_write(folder, exc, hint) from None
    discard(trial)


@contextlib.contextmanager
def staged(target: Path):
    """A temp file next to ``target`` (same file system, created empty here: a folder that takes no file is named
    as the reason, not what was to be written); removed on exit unless ``put_in_place`` took it. An OSError of the
    write (no space, a read-only file system; torch's wrapped form too) becomes one line naming ``target``."""
    tmp = temp_beside(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _new_file(tmp)
    except OSError as exc:
        raise cannot_write(target.parent, exc) from None
    try:
        yield tmp
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS and exc.filename not in (str(tmp), str(target)):
            raise
        raise write_failed(target, exc) from None
    except RuntimeError as exc:  # torch.save / TorchScript: torch's zip writer wraps a refused write (run_dirs.py)
        from marginlab.run_dirs import system_cause, system_reason

        cause = system_cause(exc)
        if cause is None or (isinstance(cause, OSError) and cause.errno not in WRITE_ERRNOS):
            raise
        raise write_failed(target, system_reason(exc)) from None
    finally:
        discard(tmp)


def put_in_place(tmp: Path, target: Path) -> None:
    """Renames ``tmp`` to ``target``, whose name is first taken exclusively: an existing file is never replaced."""
    try:
        _new_file(target)
    except FileExistsError:
        raise exists_error(target) from None
    except OSError as exc:
        raise write_failed(target, exc) from None
    os.replace(tmp, target)


def write_text(target: Path, text: str) -> None:
    """``text`` into a new file ``target`` (staged, never over an existing file; ``replace_text`` replaces one)."""
    with staged(target) as tmp:
        tmp.write_text(text)
        put_in_place(tmp, target)


#: the key that lists a record's non-finite values (path -> "nan", "inf" or "-inf")
NONFINITE_KEY = "nonfinite"


def _name(value: float) -> str:
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _clean(value: Any, path: str, found: dict[str, str]) -> Any:
    """``value`` with NaN/inf replaced by None; each one's path goes into ``found``."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy scalars: plain Python numbers
    if isinstance(value, float) and not math.isfinite(value):
        found[path] = _name(value)
        return None
    if isinstance(value, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def strict(record: dict) -> dict:
    """The record as strict JSON allows it: NaN/inf become None, listed under ``"nonfinite"``."""
    found: dict[str, str] = {}
    out = _clean(record, "", found)
    if found:
        out[NONFINITE_KEY] = {**(record.get(NONFINITE_KEY) or {}), **found}
    return out


def dumps(record: dict, **kwargs: Any) -> str:
    """``json.dumps`` of ``strict(record)``; never writes NaN or Infinity."""
    return json.dumps(strict(record), allow_nan=False, **kwargs)


def restore_nonfinite(record: dict) -> dict:
    """A record read back: the top-level values listed under ``"nonfinite"`` are floats again (nan, inf, -inf)."""
    listed = record.get(NONFINITE_KEY)
    if not isinstance(listed, dict):
        return record
    out = dict(record)
    for key, name in listed.items():
        if key in out and out[key] is None and name in ("nan", "inf", "-inf"):
            out[key] = float(name)
    return out


def write_json(path: Path, data: dict) -> None:
    """Strict JSON, written atomically and durably (``replace_text``)."""
    replace_text(path, dumps(data, indent=2, sort_keys=True) + "\n")
