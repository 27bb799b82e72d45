"""Files an export, embed or eval writes: the folder checked before the work, each file staged in the target's
folder, put in place only when complete, never over an existing file. A folder or file that cannot be written is
one line naming it and the OS's reason (an OutputError), never a traceback; a failed cleanup never hides it."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from marginlab.errors import OutputError
from marginlab.files import discard

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


def refuse_existing(*paths: Path, key: str = "out") -> None:
    for path in paths:
        if path.exists():
            raise OutputError(f"{path} exists; marginlab never overwrites a file: remove it or give another {key}=")


def cannot_write(path: Path, exc: OSError, hint: str = "") -> OutputError:
    return OutputError(f"{path}: cannot write there ({exc.strerror or exc}){hint}")


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
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
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
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    except RuntimeError as exc:  # torch.save / TorchScript: torch's zip writer wraps a refused write (run_dirs.py)
        from marginlab.run_dirs import system_cause, system_reason

        cause = system_cause(exc)
        if cause is None or (isinstance(cause, OSError) and cause.errno not in WRITE_ERRNOS):
            raise
        raise OutputError(f"{target}: cannot write ({system_reason(exc)})") from None
    finally:
        discard(tmp)


def put_in_place(tmp: Path, target: Path) -> None:
    """Renames ``tmp`` to ``target``, whose name is first taken exclusively: an existing file is never replaced."""
    try:
        _new_file(target)
    except FileExistsError:
        raise OutputError(
            f"{target} exists; marginlab never overwrites a file: remove it or give another out="
        ) from None
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    os.replace(tmp, target)


def write_text(target: Path, text: str) -> None:
    """``text`` into a new file ``target`` (staged, never over an existing file)."""
    with staged(target) as tmp:
        tmp.write_text(text)
        put_in_place(tmp, target)
