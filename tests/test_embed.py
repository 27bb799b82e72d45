"""``marginlab embed``: an image folder, a .rec and a .bin give the embeddings the backbone computes directly (flip
TTA as verification), in the order of the index; errors are one line."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from marginlab.backbones.digits_cnn import DigitsCNN
from marginlab.commands.cli import main
from marginlab.data.face.recordio import write_face_records

SIZE = 112


def face(seed: int) -> np.ndarray:
    """An RGB uint8 112x112 image, asymmetric left/right so that a flip changes it."""
    img = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    img[:, :20] = seed * 40 % 256
    return img


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # lossless: the decoded pixels are the array
    return buf.getvalue()


@pytest.fixture
def checkpoint(tmp_path):
    """A face checkpoint (3 x 112 x 112 input) of a small backbone, and that backbone in eval mode."""
    torch.manual_seed(0)
    model = DigitsCNN(embedding_dim=16, in_channels=3, image_size=SIZE, width=4).eval()
    ckpt = {
        "model": {f"backbone.{k}": v for k, v in model.state_dict().items()},
        "config": {
            "backbone": {"_target_": "marginlab.backbones.digits_cnn.DigitsCNN", "embedding_dim": 16, "width": 4},
            "dataset": {"_target_": "marginlab.data.face.casia.CasiaData"},
            "head": {},
        },
        "data": {"in_channels": 3, "image_size": SIZE, "num_classes": 3},
        "state": {"epoch": 1},
    }
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    return path, model


def expected(model, images: list[np.ndarray], flip: bool) -> np.ndarray:
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        emb = model(x) + (model(x.flip(-1)) if flip else 0)
    return F.normalize(emb, dim=1).numpy()


def read_index(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


@pytest.mark.parametrize("flip", [True, False])
def test_image_folder(checkpoint, tmp_path, flip):
    ckpt, model = checkpoint
    images = {}
    for identity, seeds in (("alice", (1, 2)), ("bob", (3,)), ("carol", (4, 5))):
        for seed in seeds:
            (tmp_path / "faces" / identity).mkdir(parents=True, exist_ok=True)
            (tmp_path / "faces" / identity / f"{seed}.png").write_bytes(png(face(seed)))
            images[f"{identity}/{seed}.png"] = face(seed)
    out = tmp_path / "emb.npy"
    assert (
        main(
            [
                "embed",
                f"checkpoint={ckpt.parent.parent}",
                f"input={tmp_path / 'faces'}",
                f"out={out}",
                f"flip={str(flip).lower()}",
                "batch_size=2",
            ]
        )
        == 0
    )
    header, *rows = read_index(tmp_path / "emb.tsv")
    assert header == ["index", "path", "label", "identity"]
    assert [r[1] for r in rows] == list(images) and [r[3] for r in rows] == ["alice"] * 2 + ["bob"] + ["carol"] * 2
    assert [int(r[2]) for r in rows] == [0, 0, 1, 2, 2]
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, expected(model, list(images.values()), flip), rtol=1e-5, atol=1e-6)


def test_recordio(checkpoint, tmp_path):
    ckpt, model = checkpoint
    samples = [(png(face(seed)), label) for seed, label in ((1, 2), (2, 0), (3, 1), (4, 0))]
    rec, _ = write_face_records(tmp_path / "data", samples)  # InsightFace layout: sorted by label, keys 1..4
    out = tmp_path / "rec.npy"
    assert main(["embed", f"checkpoint={ckpt}", f"input={rec}", f"out={out}", "batch_size=3"]) == 0
    header, *rows = read_index(tmp_path / "rec.tsv")
    assert header == ["index", "key", "label"] and [r[1:] for r in rows] == [
        ["1", "0"],
        ["2", "0"],
        ["3", "1"],
        ["4", "2"],
    ]
    order = [face(2), face(4), face(3), face(1)]  # by label, as written
    np.testing.assert_allclose(np.load(out), expected(model, order, flip=True), rtol=1e-5, atol=1e-6)


def test_verification_bin(checkpoint, tmp_path):
    ckpt, model = checkpoint
    images = [face(seed) for seed in range(1, 5)]
    (tmp_path / "pairs.bin").write_bytes(pickle.dumps(([png(i) for i in images], [True, False]), protocol=2))
    out = tmp_path / "bin.npy"
    assert main(["embed", f"checkpoint={ckpt}", f"input={tmp_path / 'pairs.bin'}", f"out={out}"]) == 0
    assert read_index(tmp_path / "bin.tsv") == [
        ["index", "pair", "issame"],
        ["0", "0", "1"],
        ["1", "0", "1"],
        ["2", "1", "0"],
        ["3", "1", "0"],
    ]
    np.testing.assert_allclose(np.load(out), expected(model, images, flip=True), rtol=1e-5, atol=1e-6)


def test_errors_are_one_line_and_nothing_is_overwritten(checkpoint, tmp_path, capsys):
    ckpt, _ = checkpoint
    (tmp_path / "faces" / "a").mkdir(parents=True)
    (tmp_path / "faces" / "a" / "1.png").write_bytes(png(face(1)))
    taken = tmp_path / "taken.npy"
    taken.write_text("mine")
    cases = [
        ([f"input={tmp_path / 'faces'}", f"out={taken}"], f"{taken} exists"),
        ([f"input={tmp_path / 'faces.txt'}", f"out={tmp_path / 'x.npy'}"], "input="),
        ([f"input={tmp_path / 'faces'}", f"out={tmp_path / 'x.csv'}"], "give a .npy file"),
        ([f"input={tmp_path / 'faces'}", f"out={tmp_path / 'x.npy'}", "flip=maybe"], "flip='maybe'"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["embed", f"checkpoint={ckpt}", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("marginlab: error: ") and message in err, err
    assert taken.read_text() == "mine" and not (tmp_path / "x.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["faces", "run", "taken.npy"]  # no temp file left


def test_a_model_that_does_not_take_face_crops_is_refused(tmp_path, capsys):
    model = DigitsCNN(embedding_dim=8, in_channels=1, image_size=8, width=4)
    path = tmp_path / "digits.pt"
    torch.save(
        {
            "model": {f"backbone.{k}": v for k, v in model.state_dict().items()},
            "config": {
                "backbone": {"_target_": "marginlab.backbones.digits_cnn.DigitsCNN", "embedding_dim": 8, "width": 4}
            },
            "data": {"in_channels": 1, "image_size": 8, "num_classes": 10},
        },
        path,
    )
    (tmp_path / "faces" / "a").mkdir(parents=True)
    (tmp_path / "faces" / "a" / "1.png").write_bytes(png(face(1)))
    assert main(["embed", f"checkpoint={path}", f"input={tmp_path / 'faces'}", f"out={tmp_path / 'e.npy'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not fit the verification images" in err
