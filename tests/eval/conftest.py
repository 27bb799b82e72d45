"""A small IJB-style release written by the tests: meta/ files in InsightFace's format and loose crops."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from marginlab.data.face.align import ARCFACE_TEMPLATE

# 8 images -> 4 templates; media 10 holds two frames of template 1, media 12 two of template 2
TEMPLATES = [1, 1, 1, 2, 2, 3, 4, 4]
MEDIAS = [10, 10, 11, 12, 12, 13, 14, 15]
PAIRS = [(1, 2, 1), (1, 3, 0), (2, 4, 0), (3, 4, 1), (1, 4, 0), (2, 3, 0)]


def landmarks(seed: int) -> np.ndarray:
    """The ArcFace template shrunk, rotated a little and moved: a face somewhere in the photo."""
    rng = np.random.default_rng(100 + seed)
    angle = rng.uniform(-0.3, 0.3)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return (ARCFACE_TEMPLATE - 56) @ rot.T * rng.uniform(0.6, 0.9) + [50, 60] + rng.normal(0, 1, (5, 2))


def write_ijb(root: Path, photo, name: str = "ijbc") -> SimpleNamespace:
    import cv2

    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    images, points, scores = [], [], []
    for i in range(len(TEMPLATES)):
        img = photo(i)
        cv2.imwrite(str(root / "loose_crop" / f"{i + 1}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))  # lossless
        images.append(img)
        points.append(landmarks(i))
        scores.append(round(0.5 + 0.06 * i, 3))
    names = [f"{i + 1}.png" for i in range(len(TEMPLATES))]
    (root / "meta" / f"{name}_face_tid_mid.txt").write_text(
        "".join(f"{n} {t} {m}\n" for n, t, m in zip(names, TEMPLATES, MEDIAS))
    )
    (root / "meta" / f"{name}_name_5pts_score.txt").write_text(
        "".join(f"{n} {' '.join(f'{v:.4f}' for v in p.ravel())} {s}\n" for n, p, s in zip(names, points, scores))
    )
    (root / "meta" / f"{name}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in PAIRS))
    return SimpleNamespace(
        root=root,
        names=names,
        images=images,
        landmarks=[np.array([float(f"{v:.4f}") for v in p.ravel()]).reshape(5, 2) for p in points],
        faceness=np.array(scores),
        templates=np.array(TEMPLATES),
        medias=np.array(MEDIAS),
        pairs=np.array(PAIRS),
    )


#: the 1:N files (subjects as PAIRS says: templates 1, 2 one person, 3, 4 another): gallery -> templates
SEARCH = {"G1": [1], "G2": [3], "probe_mixed": [2, 4]}
SUBJECTS = {1: 101, 2: 101, 3: 102, 4: 102}


def write_ijb_1n(root: Path, name: str = "ijbc") -> None:
    """``meta/<name>_1N_gallery_{G1,G2}.csv`` (IJB-B: S1, S2) and ``_1N_probe_mixed.csv``: one row per image."""
    for key, templates in SEARCH.items():
        kind = key if key == "probe_mixed" else f"gallery_{key if name == 'ijbc' else 'S' + key[1]}"
        rows = [f"{t},{SUBJECTS[t]},{i + 1}.png,0\n" for t in templates for i, ti in enumerate(TEMPLATES) if ti == t]
        path = root / "meta" / f"{name}_1N_{kind}.csv"
        path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n" + "".join(rows))


@pytest.fixture
def ijb(tmp_path, face):
    return write_ijb(tmp_path / "IJBC", face.photo)


@pytest.fixture
def face_checkpoint(tmp_path):
    """``face_checkpoint(name, embedding_dim, width, epoch)``: a small face-model checkpoint of a run, as training
    writes it (a DigitsCNN on 112x112 RGB)."""

    def write(name: str = "best.pt", embedding_dim: int = 8, width: int = 2, epoch: int = 4) -> Path:
        import torch

        from marginlab.backbones.digits_cnn import DigitsCNN

        torch.manual_seed(0)
        model = DigitsCNN(embedding_dim=embedding_dim, in_channels=3, image_size=112, width=width).eval()
        target = "marginlab.backbones.digits_cnn.DigitsCNN"
        ckpt = {
            "model": {f"backbone.{k}": v for k, v in model.state_dict().items()},
            "config": {
                "backbone": {"_target_": target, "embedding_dim": embedding_dim, "width": width},
                "dataset": {"_target_": "marginlab.data.face.casia.CasiaData"},
                "head": {},
            },
            "data": {"in_channels": 3, "image_size": 112, "num_classes": 3},
            "state": {"epoch": epoch},
        }
        path = tmp_path / "run" / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, path)
        return path

    return write
