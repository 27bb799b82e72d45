"""marginlab/files.py: a file replaced whole or not at all, flushed before the rename, its directory after."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from marginlab.files import replace_file, replace_text, write_json


def test_the_text_is_on_disk_before_the_rename_and_the_rename_after_it(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    synced, real = [], os.fsync

    def fsync(fd):
        synced.append((stat.S_ISDIR(os.fstat(fd).st_mode), target.read_text()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    replace_text(target, "new")
    assert synced == [(False, "old"), (True, "new")]  # the temp file while the target is still old; then the dir
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_json(target, {"status": "completed"})
    before = target.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"status": "failed"})
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_two_writers_never_share_a_temp_file(tmp_path, monkeypatch):
    """The temp name is unique per write (a fixed ``<name>.tmp`` let one writer rename the other's half file)."""
    names, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: names.append(os.path.basename(src)) or real(src, dst))
    replace_text(tmp_path / "a.json", "1")
    replace_text(tmp_path / "a.json", "2")
    assert len(set(names)) == 2 and all(n.startswith(".a.json.") and n.endswith(".tmp") for n in names)


def test_a_cleanup_that_fails_never_hides_the_error(tmp_path, monkeypatch):
    # a read-only file system refuses even the unlink of the temp file that was never made (EROFS, not ENOENT)
    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    def full_disk(f):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(OSError, match="No space left") as raised:
        replace_file(tmp_path / "a.json", full_disk)
    assert raised.value.errno == errno.ENOSPC and raised.value.__context__ is None
