"""Files an export or embed writes: staged in the target's folder, put in place only when complete, never over
an existing file."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from marginlab.errors import OutputError


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


@contextlib.contextmanager
def staged(target: Path):
    """A temp file next to ``target`` (same file system); removed on exit unless ``put_in_place`` took it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def put_in_place(tmp: Path, target: Path) -> None:
    """Renames ``tmp`` to ``target``, whose name is first taken exclusively: an existing file is never replaced."""
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
