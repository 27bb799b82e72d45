"""Face data you can trust (issue #12): exact resume with DataLoader workers, a refused run that would take no
step, class counts checked against the labels, symlink loops, and one-line decode errors from workers."""

from __future__ import annotations

import os

import pytest
import torch

from marginlab.data.face.casia import CasiaData
from marginlab.data.face.recordio import IRHeader, RecordIOWriter, pack, write_face_records
from marginlab.errors import ConfigError, DataError

SIZE = 16  # tiny crops and a tiny backbone keep the end-to-end runs around a second
RUN = [
    "dataset=casia",
    "dataset.batch_size=4",
    f"dataset.image_size={SIZE}",
    "backbone=sfnet4",
    "backbone.embedding_dim=16",
    "head=arcface",
    "logger=quiet",
    "trainer.epochs=2",
]


def model_weights(run_dir):
    try:
        from marginlab.training.checkpoint import read_checkpoint
    except ImportError:
        return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    return read_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def write_rec(face, root, labels, style="im2rec"):
    """A .rec/.idx pair of tiny PNG crops with these labels (im2rec: float labels written as they are)."""
    images = [face.encode(face.image(i, (SIZE, SIZE))) for i in range(len(labels))]
    if style != "im2rec":
        write_face_records(root, list(zip(images, labels)), style=style)
        return root
    root.mkdir(parents=True, exist_ok=True)
    with RecordIOWriter(root / "train.rec", root / "train.idx") as w:
        for key, (img, label) in enumerate(zip(images, labels)):
            w.write_idx(key, pack(IRHeader(0, float(label), key, 0), img))
    return root


def test_resume_with_workers_is_exact(tmp_path, face, run_train, monkeypatch):
    """2 epochs straight == 1 epoch + resume 1 epoch with 2 persistent workers and random flips: every batch
    reseeds its worker from (seed, epoch, batch), whatever the worker did before."""
    root = write_rec(face, tmp_path / "casia", [i // 6 for i in range(24)], style="insightface")
    run = [*RUN, f"dataset.root={root}", "dataset.num_workers=2"]
    code, straight = run_train(*run)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    code, _ = run_train(*run, "trainer.stop_after_epoch=1")
    assert code == 0
    code, _ = run_train("resume=latest")
    split = next((tmp_path / "second" / "runs").iterdir())
    assert code == 0
    a, b = model_weights(straight), model_weights(split)
    assert a.keys() == b.keys()
    assert [key for key in a if not torch.equal(a[key], b[key])] == []


def test_fewer_images_than_a_batch_is_refused(tmp_path, face, run_train, capfd, outputs_dir, metrics):
    root = write_rec(face, tmp_path / "casia", [0, 0, 1, 1, 2, 2, 3, 3])
    code, _ = run_train(
        *RUN, f"dataset.root={root}", "dataset.num_workers=0", "dataset.batch_size=16", "dataset.drop_last=true"
    )
    err = capfd.readouterr().err
    assert code == 2
    assert "dataset.batch_size=16" in err and "8 images" in err and "dataset.drop_last" in err
    (run_dir,) = outputs_dir.glob("runs/*")  # refused before training: no step, no checkpoint, not "completed"
    assert metrics[0](run_dir)["status"] == "failed" and not list(run_dir.glob("checkpoints/*.pt"))


def test_corrupt_label_would_make_a_huge_head(tmp_path, face):
    root = write_rec(face, tmp_path, [0, 0, 1, 1, 2, 1_000_000, 2, 1])
    with pytest.raises(DataError) as err:
        CasiaData(root=str(root)).setup()
    msg = str(err.value)
    assert "train.rec: record 5 " in msg and "label 1000000" in msg and "1,000,001 classes" in msg
    assert "dataset.num_classes" in msg


def test_corrupt_header_identity_range_is_refused(tmp_path, face):
    """InsightFace layout: images at keys 1..4 (2 identities), but the key-0 header claims 5000 identities."""
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key, label in enumerate([0, 0, 1, 1], start=1):
            image = face.encode(face.image(key, (SIZE, SIZE)))
            w.write_idx(key, pack(IRHeader(0, [float(label), 1.0], key, 0), image))
        w.write_idx(0, pack(IRHeader(0, [5.0, 5005.0], 0, 0), b""))
    with pytest.raises(DataError, match=r"train.rec: record 0 \(the header\).*5,000 classes.*2 distinct labels"):
        CasiaData(root=str(tmp_path)).setup()


def test_explicit_num_classes_is_used_and_checked(tmp_path, face, run_train, capfd):
    root = write_rec(face, tmp_path / "casia", [0, 0, 1, 1, 2, 1_000_000, 2, 1])
    data = CasiaData(root=str(root), num_classes=1_000_001)
    assert data.num_classes == 1_000_001  # the user said so
    assert CasiaData(root=str(write_rec(face, tmp_path / "ok", [0, 1, 2, 1])), num_classes=10).num_classes == 10
    with pytest.raises(DataError, match=r"train.rec: record 5 .*label 1000000 is not below dataset.num_classes=3"):
        CasiaData(root=str(root), num_classes=3).setup()
    with pytest.raises(ConfigError, match="dataset.num_classes=0"):
        CasiaData(root=str(root), num_classes=0)
    code, _ = run_train(*RUN, f"dataset.root={root}", "dataset.num_workers=0", "dataset.num_classes=3")
    assert code == 2 and "is not below dataset.num_classes=3" in capfd.readouterr().err


@pytest.mark.parametrize("label", [-1.0, 2.5, float("nan"), 1e20])
def test_negative_or_fractional_labels_are_refused(tmp_path, face, label):
    root = write_rec(face, tmp_path, [0, 1, label, 1])
    with pytest.raises(DataError, match=r"train.rec: record 2 .*is not a class index"):
        CasiaData(root=str(root)).setup()


def write_folder(face, root, identities=2, per=2):
    for i in range(identities):
        (root / f"id{i}").mkdir(parents=True, exist_ok=True)
        for j in range(per):
            (root / f"id{i}" / f"{j}.png").write_bytes(face.encode(face.image(10 * i + j, (SIZE, SIZE))))
    return root


def test_image_folder_symlink_loop_is_refused(tmp_path, face):
    root = write_folder(face, tmp_path / "faces")
    (root / "id0" / "back").symlink_to(root, target_is_directory=True)  # a class dir linking to its parent
    with pytest.raises(DataError, match=r"id0/back is a symbolic link to .*faces, a folder that contains it"):
        CasiaData(root=str(root), format="folder").setup()


def test_image_folder_still_follows_links_that_do_not_loop(tmp_path, face):
    root = write_folder(face, tmp_path / "faces")
    elsewhere = write_folder(face, tmp_path / "elsewhere", identities=1, per=3)
    (root / "id2").symlink_to(elsewhere / "id0", target_is_directory=True)  # a whole identity, linked in
    (root / "id0" / "more").symlink_to(elsewhere / "id0", target_is_directory=True)  # a sub-folder, linked in
    data = CasiaData(root=str(root), format="folder")
    data.setup()
    assert data.num_classes == 3 and len(data.train_set) == 2 + 3 + 2 + 3


@pytest.mark.parametrize("kind", ["rec", "folder"])
def test_decode_error_in_a_worker_is_one_line(tmp_path, face, kind, run_train, capfd):
    if kind == "rec":
        root = tmp_path / "casia"
        samples = [(face.encode(face.image(i, (SIZE, SIZE))), i % 2) for i in range(8)]
        samples[5] = (b"\xff\xd8\xff\xe0 this is not a JPEG", 1)
        write_face_records(root, samples, style="im2rec")
        where = "train.rec: record 5 (offset"
    else:
        root = write_folder(face, tmp_path / "faces", per=4)
        (root / "id1" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        where = os.path.join("id1", "2.png")
    code, _ = run_train(*RUN, f"dataset.root={root}", "dataset.num_workers=2")
    err = capfd.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("marginlab: error: ") and where in lines[0] and "cannot decode the image" in lines[0]
    assert "Traceback" not in err and "DataLoader worker" not in err
