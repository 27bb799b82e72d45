"""Files replaced whole or not at all: the new content goes to a temp file beside the target (a unique name, the
same file system), is flushed to disk, renamed over the target, and the directory's entry is flushed too. A kill
or a power loss leaves the old file or the new one, never half of one, and the temp file never stays behind.
What uses it: the checkpoints and the trimmed metrics.jsonl of a resumed run (checkpoint.py), metrics.json and
the other JSON records (logging/run_log.py), the resume history (resume.py)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO


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


def replace_file(path: str | os.PathLike, write: Callable[[IO], object], binary: bool = False) -> None:
    """``path`` holds what ``write(f)`` wrote into ``f`` (text, or bytes with ``binary``), atomically and durably
    (see the module doc). The file gets the permissions a plain open() gives (0o666 less the umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")  # unique: two writers never share one
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
