"""Small face data sets written in the real on-disk formats (shared by the tests in tests/face/)."""

from __future__ import annotations

import io
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image


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
    out += b"](" # EMPTY_LIST, MARK
    for b in bins:
        out += (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b
    out += b"e](" # APPENDS, EMPTY_LIST, MARK
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


@pytest.fixture
def face():
    return SimpleNamespace(image=face_image, encode=encode, normalized=normalized, py2_bin_pickle=py2_bin_pickle,
                           write_lfw=write_lfw)
