"""``FileLock``: an advisory ``flock`` on one file, what keeps two processes from writing one run
(``run_dirs.RunLock``) or one IJB feature file (``eval.ijb_data.extraction_lock``) at once.

The OS drops the lock when its process dies, so a killed process never leaves one held; the (empty) lock file is
left in place: removing it would let a third process lock a new file while a second still holds the old one.
Where there is no flock (Windows; ENOLCK on some network file systems) nothing is locked and ``acquire`` says so.
"""

from __future__ import annotations

import os
from pathlib import Path


class FileLock:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, block: bool = False) -> bool:
        """Takes the lock: True when this process holds it, or when there is no flock to take; False when another
        process holds it (``block``: waits for it instead). OSError when the lock file cannot be created."""
        try:
            import fcntl
        except ImportError:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError:  # e.g. ENOLCK on a network file system: no lock to take
            os.close(fd)
            return True
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
