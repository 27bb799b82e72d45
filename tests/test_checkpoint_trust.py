"""Checkpoints you can trust (issue #12): reading one never runs code, old ones still load, bad ones are one clear
line, they get the run's permissions, a killed save leaves nothing behind, non-finite weights are never saved."""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import zipfile

import numpy as np
import pytest
import torch

from marginlab.errors import DataError
from marginlab.training import checkpoint

from .conftest import run_cli

FAST = ["logger=quiet", "sched=constant"]
MARKER = "pwned"


class Touch:
    """Unpickling this (with weights_only=False) creates a file: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


class System:
    """Unpickling this runs a shell command: a GLOBAL of a module torch blocks (os / posix)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def with_pickle(good: pathlib.Path, dest: pathlib.Path, data_pkl: bytes) -> pathlib.Path:
    """``good`` (a torch zip checkpoint) with its pickle replaced by ``data_pkl``: a hand-made hostile file."""
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, data_pkl if info.filename.endswith("/data.pkl") else zin.read(info.filename))
    return dest


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def error_line(capfd) -> str:
    """stderr must be exactly one line: the error."""
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One digits run stopped after epoch 1 of 2 (a checkpoint to resume and to evaluate), made once."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MARGINLAB_OUTPUT_DIR", str(out))
        mp.setenv("MARGINLAB_DATA_DIR", str(out / "data"))
        assert run_cli("train", *FAST, "trainer.epochs=2", "trainer.stop_after_epoch=1") == 0
    (run_dir,) = (out / "runs").iterdir()
    return run_dir


@pytest.fixture
def run_dir(trained, outputs_dir):
    """A fresh copy of ``trained`` under this test's outputs dir."""
    return shutil.copytree(trained, outputs_dir / "runs" / trained.name)


# ---------------------------------------------------------------- 1. plain data only
def test_checkpoint_holds_only_what_weights_only_loading_accepts(run_dir):
    path = run_dir / "checkpoints" / "last.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    ckpt = load(path)  # no allow-list needed
    assert isinstance(ckpt["config"], dict) and ckpt["state"]["epoch"] == 1


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian: every field of numpy's state matters
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


# ---------------------------------------------------------------- 2. today's format still loads
def todays_rng(saved: dict) -> dict:
    """The ``rng`` entry exactly as marginlab's first release wrote it (random.getstate(), np.random.get_state())."""
    numpy = saved["numpy"]
    return {
        "python": (saved["python"][0], tuple(saved["python"][1]), saved["python"][2]),
        "numpy": (
            numpy["bit_generator"],
            numpy["key"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        ),
        "torch": saved["torch"],
    }


def test_checkpoint_in_todays_format_loads_and_resumes(run_dir, run_train, metrics):
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = load(path)
    ckpt["rng"] = todays_rng(ckpt["rng"])
    torch.save(ckpt, path)  # numpy's ndarray inside: needs numpy's reconstruct globals to unpickle
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path)
    old = checkpoint.read_checkpoint(path, checkpoint.RESUME_KEYS)
    checkpoint.set_rng_state(old["rng"])
    assert checkpoint.rng_state()["numpy"]["key"].tolist() == ckpt["rng"]["numpy"][1].tolist()
    code, _ = run_train(f"resume={run_dir}")
    assert code == 0
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2] and metrics[0](run_dir)["status"] == "completed"


# ---------------------------------------------------------------- 3. bad files: one line, exit 2, nothing run
def bad_files(tmp_path, good: pathlib.Path) -> dict[str, bytes]:
    """The reason each error must give -> the file's content."""
    marker = tmp_path / MARKER
    torch.save({"model": Touch(marker), "config": {}, "data": {}}, tmp_path / "evil.pt")
    torch.save({"model": System(marker), "config": {}, "data": {}}, tmp_path / "system.pt")
    return {
        "refused as unsafe: it asks for getattr, which a checkpoint may not hold; nothing was run": (
            tmp_path / "evil.pt"
        ).read_bytes(),
        f"refused as unsafe: it asks for {os.system.__module__}.system": (tmp_path / "system.pt").read_bytes(),
        "the file is empty (0 bytes)": b"",
        "truncated or corrupted": good.read_bytes()[: good.stat().st_size // 2],
        "not a torch.save file": b"epoch,acc\n1,0.5\n",
    }


def test_hostile_or_broken_checkpoint_runs_nothing(run_dir, tmp_path, capfd):
    last = run_dir / "checkpoints" / "last.pt"
    kinds = bad_files(tmp_path, last)
    for reason, content in kinds.items():
        last.write_bytes(content)
        capfd.readouterr()
        assert run_cli("train", f"resume={run_dir}") == 2, reason
        line = error_line(capfd)
        assert line.startswith(f"marginlab: error: {last}: not a loadable checkpoint: ") and reason in line, line
        assert run_cli("eval", f"checkpoint={last}", "verification=[lfw]") == 2, reason
        line = error_line(capfd)
        assert line.startswith(f"marginlab: error: {last}: not a loadable checkpoint: ") and reason in line, line
        assert "weights_only" not in line and "trusted source" not in line, line  # never advice to load it anyway
        assert not (tmp_path / MARKER).exists()
    assert not list(run_dir.glob("checkpoints/*.eval.json"))


def test_forbidden_global_is_named(tmp_path):
    torch.save({"model": Touch(tmp_path / MARKER)}, tmp_path / "evil.pt")
    with pytest.raises(
        DataError, match=r"evil\.pt: not a loadable checkpoint: refused as unsafe: it asks for .*nothing was run"
    ):
        checkpoint.read_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / MARKER).exists()


def hostile_files(tmp_path, good: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every kind of pickle torch's weights-only loader refuses, in a zip checkpoint (and one legacy file)."""
    marker = tmp_path / MARKER
    torch.save({"model": Touch(marker)}, tmp_path / "getattr.pt")
    torch.save({"model": System(marker)}, tmp_path / "blocked.pt")
    torch.save({"model": System(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    return {
        "getattr": tmp_path / "getattr.pt",  # a GLOBAL outside the allow-list
        "blocked": tmp_path / "blocked.pt",  # a GLOBAL of a blocked module (os.system)
        "legacy": tmp_path / "legacy.pt",
        "eval": with_pickle(good, tmp_path / "eval.pt", b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."),
        "opcode": with_pickle(good, tmp_path / "opcode.pt", b"\x80\x02(i__builtin__\nset\n."),  # INST
        "persistent_id": with_pickle(good, tmp_path / "persistent_id.pt", b"\x80\x02X\x01\x00\x00\x00aQ."),
    }


def test_a_hostile_file_is_refused_as_unsafe_without_torchs_advice_to_load_it_anyway(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "good.pt")
    for kind, path in hostile_files(tmp_path, tmp_path / "good.pt").items():
        with pytest.raises(DataError) as caught:
            checkpoint.read_checkpoint(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: not a loadable checkpoint: refused as unsafe: "), (kind, message)
        assert message.endswith("; nothing was run") and "\n" not in message, (kind, message)
        assert "weights_only" not in message.lower() and "trusted source" not in message, (kind, message)
    assert not (tmp_path / MARKER).exists()


# ---------------------------------------------------------------- 4. permissions like the run's other files
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        checkpoint.save_atomic({"x": torch.zeros(1)}, tmp_path / "last.pt")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "last.pt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


# ---------------------------------------------------------------- 5. a kill during the save
class Killed(BaseException):
    """SIGKILL-like: nothing in the trainer catches it."""


def test_kill_while_saving_leaves_no_temp_file_and_no_duplicate_record(run_train, metrics, outputs_dir, monkeypatch):
    real = checkpoint.save_atomic

    def killed_on_epoch_2(obj, path):
        if obj["state"]["epoch"] == 2 and path.name == "last.pt":
            (path.parent / f".{path.name}.half").write_bytes(b"half a checkpoint")  # what a kill leaves
            raise Killed
        real(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", killed_on_epoch_2)
    with pytest.raises(Killed):
        run_train(*FAST, "trainer.epochs=3")
    (run_dir,) = (outputs_dir / "runs").iterdir()
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2]  # the record came before the checkpoint
    monkeypatch.setattr(checkpoint, "save_atomic", real)
    code, _ = run_train(f"resume={run_dir}")
    assert code == 0
    assert [r["epoch"] for r in metrics[1](run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_save_removes_the_temp_files_of_a_killed_save(tmp_path):
    (tmp_path / ".last.pt.abc123").write_bytes(b"half")
    checkpoint.save_atomic({"x": torch.zeros(1)}, tmp_path / "last.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# ---------------------------------------------------------------- 6. non-finite weights
def all_finite(path) -> bool:
    return all(torch.isfinite(v).all() for v in load(path)["model"].values() if v.is_floating_point())


def test_inf_batchnorm_statistics_stop_the_run_and_keep_the_good_checkpoint(
    run_train, metrics, outputs_dir, monkeypatch, capfd
):
    import marginlab.training.train

    real = marginlab.training.train.train_one_epoch

    def inf_variance_in_epoch_2(parts, *args, **kwargs):
        stats = real(parts, *args, **kwargs)  # every loss finite (nonfinite_steps 0)
        if args[2].epoch == 1:  # the LoopState: epoch 1 done
            bn = next(m for m in parts.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
            bn.running_var.fill_(float("inf"))
        return stats

    monkeypatch.setattr(marginlab.training.train, "train_one_epoch", inf_variance_in_epoch_2)
    code, run_dir = run_train(*FAST, "trainer.epochs=3")
    last = run_dir / "checkpoints" / "last.pt"
    line = error_line(capfd)
    assert code == 2 and "training diverged in epoch 2" in line and "running_var" in line
    assert f"the last finite weights are in {last} (epoch 1)" in line
    assert metrics[0](run_dir)["status"] == "failed"
    assert load(last)["state"]["epoch"] == 1 and all_finite(last) and all_finite(run_dir / "checkpoints" / "best.pt")


def test_lr_1e4_fails_instead_of_completing_with_inf_weights(run_train, metrics, capfd):
    code, run_dir = run_train(*FAST, "trainer.epochs=3", "optim.lr=1e4")
    line = error_line(capfd)
    assert code == 2 and "training diverged" in line and metrics[0](run_dir)["status"] == "failed"
    last = run_dir / "checkpoints" / "last.pt"
    if last.exists():  # every checkpoint written holds finite weights, and the message says which
        assert all_finite(last)
        assert f"the last finite weights are in {last} (epoch {load(last)['state']['epoch']})" in line
    else:
        assert "no checkpoint of this run holds finite weights" in line


def test_nonfinite_loss_message_says_where_the_finite_weights_are(run_train, capfd):
    code, _ = run_train(*FAST, "trainer.epochs=2", "optim.lr=1e30", "trainer.max_nonfinite_steps=2", "head=softmax")
    line = error_line(capfd)
    assert code == 2 and "consecutive non-finite losses" in line
    assert "no checkpoint of this run holds finite weights (none was written)" in line


# ---------------------------------------------------------------- 7. every difference of a mismatched state
def test_state_mismatch_on_resume_lists_every_difference(run_dir, run_train, capfd):
    path = run_dir / "checkpoints" / "last.pt"
    ckpt = load(path)
    model = ckpt["model"]
    dropped = next(k for k in model if k.endswith("running_mean"))
    del model[dropped]
    model["backbone.extra.weight"] = torch.zeros(2)
    model["head.weight"] = torch.zeros(7, 3)
    resized = next(k for k in model if k.startswith("backbone.") and k.endswith(".weight") and model[k].dim() == 4)
    saved_shape = list(model[resized].shape)
    model[resized] = torch.zeros(1, *saved_shape[1:])
    torch.save(ckpt, path)
    capfd.readouterr()
    code, _ = run_train(f"resume={run_dir}")
    err = capfd.readouterr().err
    assert code == 2 and "does not fit this model" in err and "Traceback" not in err
    assert "missing keys (1): " + dropped in err and "unexpected keys (1): backbone.extra.weight" in err
    assert f"{resized}: saved [1, {', '.join(map(str, saved_shape[1:]))}], model {saved_shape}" in err
    assert "head.weight: saved [7, 3], model [10, " in err


# ---------------------------------------------------------------- 8. eval of a model the verification images do not fit
def test_eval_of_a_checkpoint_that_cannot_take_verification_images(run_dir, tmp_path, capfd):
    capfd.readouterr()
    # a missing .bin: reading it (or embedding anything) before the check would give another error
    missing = tmp_path / "no.bin"
    code = run_cli("eval", f"checkpoint={run_dir}", "verification=[lfw]", f"verification.lfw.path={missing}")
    line = error_line(capfd)
    assert code == 2 and "in_channels=1, image_size=8" in line and "3-channel" in line and "lfw" in line
    assert not list(run_dir.glob("checkpoints/*.eval.json"))
