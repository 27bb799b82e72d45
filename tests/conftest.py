"""Shared test fixtures: every run writes under a temporary outputs dir; runs go through the real CLI."""

from __future__ import annotations

import builtins
import io
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from marginlab.commands.cli import main


@pytest.fixture(autouse=True)
def outputs_dir(tmp_path, monkeypatch) -> Path:
    out = tmp_path / "outputs"
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(out))
    monkeypatch.setenv("MARGINLAB_DATA_DIR", str(tmp_path / "data"))
    return out


#: a tracker test's run: no TensorBoard, progress bar, console lines or figures, a small probe (its tracker alone)
TRACKER_ONLY = (
    "logger.tensorboard=false",
    "logger.progress=false",
    "logger.console=false",
    "logger.figures=false",
    "logger.probe_max_samples=64",
)


def run_cli(*args: str) -> int:
    """``marginlab <args>`` in-process; its exit code (0 when it returns normally)."""
    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code


def hide_module(monkeypatch, module: str) -> None:
    """``import <module>`` (or a submodule) fails from now on in this test, as where the package is not installed."""
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name == module or name.startswith(f"{module}."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): to check that nothing there changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_train(outputs_dir):
    """``run_train(*overrides)`` runs `marginlab train` in-process; returns (exit code, the newest run dir)."""

    def run(*overrides: str) -> tuple[int, Path | None]:
        code = run_cli("train", *overrides)
        runs = sorted(outputs_dir.glob("runs/*"), key=lambda p: p.stat().st_mtime)
        return code, (runs[-1] if runs else None)

    return run


@pytest.fixture
def straight_and_resumed(run_train, tmp_path, monkeypatch):
    """``straight_and_resumed(*overrides)``: a run straight, and the same run stopped after epoch 1 and resumed in a
    second output directory; returns their two run directories (compare their ``last_weights``)."""

    return lambda *overrides: train_straight_and_resumed(run_train, tmp_path, monkeypatch, *overrides)


def train_straight_and_resumed(run_train, tmp_path: Path, monkeypatch, *overrides: str) -> tuple[Path, Path]:
    """What ``straight_and_resumed`` runs, for helpers that take the fixtures as arguments."""
    code, straight = run_train(*overrides)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    assert run_train(*overrides, "trainer.stop_after_epoch=1")[0] == 0
    assert run_train("resume=latest")[0] == 0
    return straight, next((tmp_path / "second" / "runs").iterdir())


def last_weights(run_dir: Path) -> dict:
    """The model state of a run's ``checkpoints/last.pt``."""
    import torch  # (only the tests that train need it)

    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def read_jsonl(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def metrics():
    """Readers for a run's metrics.json / metrics.jsonl."""
    return read_metrics, read_jsonl


# ---- torchrun on CPU (gloo) for the data-parallel tests ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m marginlab train *overrides`` writing under ``out``; nproc=0 runs
    ``marginlab train`` as a plain process (no torchrun, no process group)."""
    env = {**os.environ, "MARGINLAB_OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "1"}
    runner = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
        ]
        if nproc
        else [sys.executable]
    )
    res = subprocess.run(
        [*runner, "-m", "marginlab", "train", *overrides], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def epoch_records(out: Path) -> list[dict]:
    """metrics.jsonl of the only run under ``out``."""
    (run_dir,) = list((out / "runs").iterdir())
    return read_jsonl(run_dir)


@pytest.fixture
def torchrun():
    """``torchrun.launch(nproc, out, *overrides)`` and ``torchrun.epochs(out)``."""
    return type("TorchRun", (), {"launch": staticmethod(launch), "epochs": staticmethod(epoch_records)})


# ---------------------------------------------------------------- small face data sets in the real on-disk formats
def face_image(seed: int, size=(112, 112)) -> np.ndarray:
    """A deterministic RGB uint8 image (H x W x 3) with a left/right asymmetry (so flips are visible)."""
    h, w = size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(-(-h // 8), -(-w // 8), 3), dtype=np.uint8)  # 8x8 blocks: JPEG-friendly
    img = np.ascontiguousarray(blocks.repeat(8, axis=0).repeat(8, axis=1)[:h, :w])
    img[:, : w // 4] = (seed * 37) % 256  # a flat band on the left only
    return img


def encode(array: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def normalized(array: np.ndarray) -> np.ndarray:
    """The expected tensor (3 x H x W float) for an image: (x / 255 - 0.5) / 0.5."""
    return (array.transpose(2, 0, 1).astype(np.float32) / 255.0 - 0.5) / 0.5


def py2_bin_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """``cPickle.dump((bins, issame), f, protocol=2)`` as Python 2 writes it: str as (SHORT_)BINSTRING --
    the format of InsightFace's released lfw.bin / cfp_fp.bin / agedb_30.bin."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    out += b"]("  # EMPTY_LIST, MARK
    for b in bins:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    out += b"e]("  # APPENDS, EMPTY_LIST, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    out += b"e\x86."  # APPENDS, TUPLE2, STOP
    return bytes(out)


def write_lfw(root: Path, folds: int = 2, per: int = 2, size=(112, 112)) -> tuple[Path, list[np.ndarray], list[bool]]:
    """An LFW-style folder + pairs.txt ("folds per" header; per fold ``per`` matched then ``per`` mismatched);
    returns (pairs path, the 2N images in pair order, issame)."""
    people: dict[str, list[np.ndarray]] = {}
    lines = [f"{folds}\t{per}"]
    images, issame = [], []
    seed = 0

    def add(name: str) -> tuple[int, np.ndarray]:
        nonlocal seed
        seed += 1
        img = face_image(seed, size)
        people.setdefault(name, []).append(img)
        n = len(people[name])
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{name}_{n:04d}.jpg").write_bytes(encode(img, "PNG"))  # PNG bytes: exact pixels
        return n, img

    for f in range(folds):
        for p in range(per):
            name = f"Person_{f}_{p}"
            (i, a), (j, b) = add(name), add(name)
            lines.append(f"{name}\t{i}\t{j}")
            images += [a, b]
            issame.append(True)
        for p in range(per):
            n1, n2 = f"Other_{f}_{p}_a", f"Other_{f}_{p}_b"
            (i, a), (j, b) = add(n1), add(n2)
            lines.append(f"{n1}\t{i}\t{n2}\t{j}")
            images += [a, b]
            issame.append(False)
    pairs = root / "pairs.txt"
    pairs.write_text("\n".join(lines) + "\n")
    return pairs, images, issame


def photo(seed: int, size=(120, 100)) -> np.ndarray:
    """A deterministic H x W x 3 uint8 'photo' of smooth blocks, asymmetric left/right (a face to align)."""
    h, w = size
    rng = np.random.default_rng(seed)
    img = np.ascontiguousarray(
        rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)[:h, :w]
    )
    img[:, : w // 5] = seed * 29 % 256
    return img


@pytest.fixture
def face():
    return SimpleNamespace(
        image=face_image,
        encode=encode,
        normalized=normalized,
        py2_bin_pickle=py2_bin_pickle,
        write_lfw=write_lfw,
        photo=photo,
    )
