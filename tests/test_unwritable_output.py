"""``export``, ``embed`` and ``eval`` into a folder that cannot be written (read-only file system, no permission,
a full disk): one line naming the folder or file and the OS's reason (exit 2), checked before the work where it
can be; a failed cleanup never hides it; a result eval computed is printed, never lost."""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from marginlab.backbones.digits_cnn import DigitsCNN

from .conftest import run_cli

AS_ROOT = os.name != "nt" and os.geteuid() == 0  # root ignores a folder's mode bits


def face_checkpoint(root: Path) -> Path:
    """A small face model's checkpoint (a DigitsCNN on 112x112 RGB) in ``root/run/checkpoints``."""
    torch.manual_seed(0)
    model = DigitsCNN(embedding_dim=8, in_channels=3, image_size=112, width=2).eval()
    ckpt = {
        "model": {f"backbone.{k}": v for k, v in model.state_dict().items()},
        "config": {
            "backbone": {"_target_": "marginlab.backbones.digits_cnn.DigitsCNN", "embedding_dim": 8, "width": 2},
            "dataset": {"_target_": "marginlab.data.face.casia.CasiaData"},
            "head": {},
        },
        "data": {"in_channels": 3, "image_size": 112, "num_classes": 3},
        "state": {"epoch": 4},
    }
    path = root / "run" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path


def verification_bin(path: Path, face) -> Path:
    images = [face.encode(face.image(i)) for i in range(8)]
    path.write_bytes(face.py2_bin_pickle(images, [True, False] * 2))
    return path


def unwritable(monkeypatch, folder: Path, code: int = errno.EROFS, create: bool = False) -> None:
    """Every write under ``folder`` fails with ``code``, as on a read-only file system (where even the unlink of a
    missing file fails) for a test run as root, whom a 0o555 mode does not stop: opening, creating, removing and
    renaming files, and torch's writers that open their file in C++. ``create``: folders and empty files can still
    be made, writing into them fails (a disk that fills up after the check)."""
    folder = Path(folder).absolute()

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        path = Path(os.fsdecode(path)).absolute()
        return path == folder or folder in path.parents

    def guard(real, which=0, writes=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if len(args) > which and inside(args[which]) and writes(*args, **kwargs):
                raise OSError(code, os.strerror(code), str(args[which]))
            return real(*args, **kwargs)

        return wrapped

    def opens_to_write(path, mode="r", *a, **k):
        return any(c in str(mode) for c in "wax+")

    def flags_write(path, flags, *a, **k):
        return not create and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    monkeypatch.setattr(builtins, "open", guard(builtins.open, writes=opens_to_write))
    monkeypatch.setattr(os, "open", guard(os.open, writes=flags_write))
    for name in ("unlink", "remove", "mkdir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), writes=lambda *a, **k: not create))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), which=1))
    monkeypatch.setattr(torch, "save", guard(torch.save, which=1))
    monkeypatch.setattr(torch.jit, "save", guard(torch.jit.save, which=1))
    monkeypatch.setattr(torch.onnx, "export", guard(torch.onnx.export, which=2))


def never_called(monkeypatch, module, name: str) -> list:
    """Records the calls of ``module.name`` (the expensive work that a write check must precede)."""
    calls, real = [], getattr(module, name)

    def recording(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return calls


def one_error_line(capsys) -> tuple[str, str]:
    """(the one error line, stdout). In-process, a traceback would be an exception the test sees; other stderr
    lines (a log warning) may come before the error."""
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("marginlab: error: ")]
    assert len(errors) == 1 and captured.err.strip().splitlines()[-1] == errors[0], captured.err
    return errors[0], captured.out


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "state_dict"])
def test_export_into_a_read_only_folder_names_it_before_building_the_model(fmt, tmp_path, monkeypatch, capsys):
    import marginlab.export

    pytest.importorskip("onnxruntime")
    ckpt = face_checkpoint(tmp_path)
    built = never_called(monkeypatch, marginlab.export, "load_backbone")
    unwritable(monkeypatch, ckpt.parent)
    assert run_cli("export", f"checkpoint={ckpt}", f"format={fmt}") == 2
    err, _ = one_error_line(capsys)
    assert err.startswith(f"marginlab: error: {ckpt.parent}: cannot write there (Read-only file system); give out=")
    assert built == [] and sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]


@pytest.mark.parametrize("fmt", ["onnx", "state_dict"])
def test_an_export_write_that_fails_names_the_file_not_the_model(fmt, tmp_path, monkeypatch, capsys):
    # the folder takes a file when checked; the disk is full when the model is written: the file is the reason
    pytest.importorskip("onnxruntime")
    ckpt = face_checkpoint(tmp_path)
    unwritable(monkeypatch, ckpt.parent, errno.ENOSPC, create=True)
    assert run_cli("export", f"checkpoint={ckpt}", f"format={fmt}") == 2
    err, _ = one_error_line(capsys)
    suffix = ".onnx" if fmt == "onnx" else ".state_dict.pt"
    assert err == f"marginlab: error: {ckpt.with_name('best' + suffix)}: cannot write (No space left on device)"
    assert "backbone" not in err  # not "backbone ... cannot be exported to ONNX (OSError ...)"


# ---------------------------------------------------------------- embed
def test_embed_into_a_read_only_folder_names_it_before_loading_the_model(tmp_path, monkeypatch, capsys, face):
    import marginlab.training.weights

    ckpt = face_checkpoint(tmp_path)
    images = verification_bin(tmp_path / "lfw.bin", face)
    out = tmp_path / "ro" / "emb.npy"
    out.parent.mkdir()
    built = never_called(monkeypatch, marginlab.training.weights, "load_backbone")
    unwritable(monkeypatch, out.parent)
    assert run_cli("embed", f"checkpoint={ckpt}", f"input={images}", f"out={out}") == 2
    err, _ = one_error_line(capsys)
    assert err.startswith(f"marginlab: error: {out.parent}: cannot write there (Read-only file system); give out=")
    assert built == [] and list(out.parent.iterdir()) == []


def test_an_embed_write_that_fails_names_the_file(tmp_path, monkeypatch, capsys, face):
    ckpt = face_checkpoint(tmp_path)
    images = verification_bin(tmp_path / "lfw.bin", face)
    out = tmp_path / "full" / "emb.npy"
    out.parent.mkdir()
    unwritable(monkeypatch, out.parent, errno.ENOSPC, create=True)
    assert run_cli("embed", f"checkpoint={ckpt}", f"input={images}", f"out={out}") == 2
    err, _ = one_error_line(capsys)
    assert err == f"marginlab: error: {out}: cannot write (No space left on device)"


# ---------------------------------------------------------------- eval
def eval_args(ckpt: Path, bin_path: Path) -> list[str]:
    return [
        "eval",
        f"checkpoint={ckpt}",
        "verification=[lfw]",
        f"verification.lfw.path={bin_path}",
        "verification.lfw.nfolds=2",
    ]


def test_eval_beside_a_read_only_checkpoint_names_the_folder_before_computing(tmp_path, monkeypatch, capsys, face):
    import marginlab.eval.standalone

    ckpt = face_checkpoint(tmp_path)
    lfw = verification_bin(tmp_path / "lfw.bin", face)
    computed = never_called(monkeypatch, marginlab.eval.standalone, "run_verifiers")
    unwritable(monkeypatch, ckpt.parent)
    assert run_cli(*eval_args(ckpt, lfw)) == 2
    err, _ = one_error_line(capsys)
    assert err.startswith(f"marginlab: error: {ckpt.parent}: cannot write there (Read-only file system); ")
    assert computed == [] and sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]


def test_an_eval_result_that_cannot_be_written_is_printed_not_lost(tmp_path, monkeypatch, capsys, face):
    # the folder takes a file when checked; the disk is full once the sets are scored
    ckpt = face_checkpoint(tmp_path)
    lfw = verification_bin(tmp_path / "lfw.bin", face)
    unwritable(monkeypatch, ckpt.parent, errno.ENOSPC, create=True)
    assert run_cli(*eval_args(ckpt, lfw)) == 2
    err, out = one_error_line(capsys)
    assert err.startswith(f"marginlab: error: {ckpt.parent / 'best.eval'}/lfw-")
    assert err.endswith(
        ": cannot write (No space left on device); the results of lfw are printed above (stdout), one JSON line each"
    )
    lines = out.splitlines()
    shown = next(i for i, line in enumerate(lines) if line.startswith("lfw: acc "))
    record = json.loads(lines[shown + 1])  # the record its file would have held
    assert record["set"] == "lfw" and record["epoch"] == 4 and record["options"]["nfolds"] == 2
    assert record["result"]["accuracy"] == record["scalars"]["lfw/acc"] and len(record["result"]["accuracies"]) == 2


def test_a_staged_file_whose_cleanup_fails_keeps_the_error_raised(tmp_path, monkeypatch):
    # the unlink of the temp file fails (EROFS); what failed inside stays the error
    from marginlab.files import staged

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(os, "unlink", read_only)
    with pytest.raises(KeyError, match="the real error"), staged(tmp_path / "b.npy"):
        raise KeyError("the real error")


# ---------------------------------------------------------------- a real 0o555 folder (not as root)
@pytest.mark.skipif(AS_ROOT or os.name == "nt", reason="root ignores a 0o555 mode (the tests above simulate it)")
def test_a_real_read_only_folder_is_one_line_for_each_command(tmp_path, capsys, face):
    pytest.importorskip("onnxruntime")
    ckpt = face_checkpoint(tmp_path)
    lfw = verification_bin(tmp_path / "lfw.bin", face)
    ckpt.parent.chmod(0o555)
    try:
        commands = [
            ["export", f"checkpoint={ckpt}"],
            ["embed", f"checkpoint={ckpt}", f"input={lfw}", f"out={ckpt.parent / 'emb.npy'}"],
            eval_args(ckpt, lfw),
        ]
        for args in commands:
            assert run_cli(*args) == 2
            err, _ = one_error_line(capsys)
            assert err.startswith(f"marginlab: error: {ckpt.parent}: cannot write there (Permission denied)")
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ["best.pt"]
    finally:
        ckpt.parent.chmod(0o755)


def test_embed_output_is_unchanged_where_the_folder_is_writable(tmp_path, face):
    # the check leaves nothing behind: the folder holds the two files embed writes
    ckpt = face_checkpoint(tmp_path)
    lfw = verification_bin(tmp_path / "lfw.bin", face)
    out = tmp_path / "new" / "emb.npy"
    assert run_cli("embed", f"checkpoint={ckpt}", f"input={lfw}", f"out={out}") == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["emb.npy", "emb.tsv"]
    assert np.load(out).shape == (8, 8)


def test_torchs_wrapped_write_failure_in_a_staged_file_is_one_line(tmp_path):
    # torch.save / TorchScript on a full disk: the OSError arrives wrapped in torch's zip-writer RuntimeError
    from marginlab.errors import OutputError
    from marginlab.files import staged

    target = tmp_path / "best.torchscript.pt"
    wrapped = "[enforce fail at inline_container.cc:672] . unexpected pos 3456 vs 3350"
    with pytest.raises(
        OutputError, match=r"best\.torchscript\.pt: cannot write \(No space left on device \(ENOSPC\)\)"
    ):
        with staged(target):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError(wrapped)  # noqa: B904 - torch raises it with the OSError as its context
    assert not list(tmp_path.iterdir())  # the temp file is gone
    with pytest.raises(RuntimeError, match="a bug"), staged(target):  # any other RuntimeError stays what it is
        raise RuntimeError("a bug")
