"""Five-point alignment: the ArcFace template and crops equal InsightFace's own (``face_align.norm_crop``);
``marginlab align`` writes a folder of crops, and its bad input is one line with exit 2."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from marginlab.commands.cli import main
from marginlab.data.face.align import (
    ARCFACE_TEMPLATE,
    align_face,
    parse_landmark_line,
    similarity_matrix,
)
from marginlab.errors import DataError

from ...conftest import snapshot


def landmarks(seed: int, scale=1.3, angle=0.2, shift=(20.0, 10.0)) -> np.ndarray:
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    noise = np.random.default_rng(seed).normal(0, 1.5, (5, 2))
    return ((ARCFACE_TEMPLATE @ rot.T) * scale + shift + noise).astype(np.float32)


def test_template_is_insightfaces():
    from insightface.utils.face_align import arcface_dst

    np.testing.assert_allclose(ARCFACE_TEMPLATE, arcface_dst, atol=1e-5)  # float32 62.7299 + 8 vs 70.7299
    sphereface = np.array(
        [[30.2946, 51.6963], [65.5318, 51.5014], [48.0252, 71.7366], [33.5493, 92.3655], [62.7299, 92.2041]],
        dtype=np.float32,
    )
    sphereface[:, 0] += 8.0  # eval_ijbc.py's template, to the bit
    np.testing.assert_array_equal(ARCFACE_TEMPLATE, sphereface)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # insightface calls skimage's deprecated estimate()
@pytest.mark.parametrize("seed", [0, 1])
def test_crop_equals_insightface_norm_crop(seed, face):
    from insightface.utils.face_align import arcface_dst, norm_crop

    img, lmk = face.photo(seed, size=(140, 120)), landmarks(seed)
    np.testing.assert_array_equal(align_face(img, lmk, template=arcface_dst), norm_crop(img, lmk))
    crop = align_face(img, lmk)  # eval_ijbc.py's template: float32 62.7299 + 8 is 70.729904, not 70.7299
    assert crop.shape == (112, 112, 3)
    assert np.abs(crop.astype(int) - norm_crop(img, lmk)).max() <= 1
    assert np.mean(crop == norm_crop(img, lmk)) > 0.999


def test_exact_similarity_puts_the_landmarks_on_the_template():
    lmk = landmarks(0)
    lmk_exact = ((ARCFACE_TEMPLATE - 56) * 0.7 + [60, 50]).astype(np.float32)  # a pure similarity of the template
    m = similarity_matrix(lmk_exact)
    np.testing.assert_allclose(lmk_exact @ m[:, :2].T + m[:, 2], ARCFACE_TEMPLATE, atol=1e-4)
    with pytest.raises(ValueError, match="degenerate"):
        similarity_matrix(np.zeros((5, 2)))
    assert similarity_matrix(lmk).shape == (2, 3)


def test_landmark_lines():
    name, lmk, extra = parse_landmark_line("a/b.jpg " + " ".join(["1.5"] * 10) + " 0.9", "f, line 1", extra=1)
    assert name == "a/b.jpg" and lmk.shape == (5, 2) and extra == [0.9]
    with pytest.raises(DataError, match=r"^f, line 4: expected 11 fields .* got 10$"):
        parse_landmark_line("x.jpg " + " ".join(["1"] * 9), "f, line 4")
    with pytest.raises(DataError, match=r"^f, line 2: 'nan1' is not a number$"):
        parse_landmark_line("x.jpg " + " ".join(["1"] * 9) + " nan1", "f, line 2")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e39"])
def test_landmark_numbers_must_be_finite_in_float32(bad):
    with pytest.raises(DataError, match=r"^f, line 3: the numbers must be finite \(within float32\), got "):
        parse_landmark_line(f"x.jpg {bad} " + " ".join(["1"] * 9), "f, line 3")


def test_landmarks_off_the_image_are_refused_with_a_margin_of_a_tenth():
    image = np.zeros((140, 120, 3), np.uint8)  # 120 wide, 140 high: x may go from -12 to 132, y from -14 to 154
    lmk = landmarks(0)
    for dx, dy in [(-12, 0), (132, 0), (0, -14), (0, 154)]:
        edge = lmk.copy()
        edge[4] = (dx, dy)  # a mouth corner just within the margin: a face cut by the border
        assert align_face(image, edge).shape == (112, 112, 3)
    for point, k in [((132.5, 50.0), 5), ((60.0, -14.5), 5), ((1e30, 51.0), 5), ((np.nan, 51.0), 5)]:
        off = lmk.copy()
        off[k - 1] = point
        with pytest.raises(ValueError, match=rf"^landmark {k} \(x=\S+, y=\S+\) is off the 120x140 image: allowed "):
            align_face(image, off)


@pytest.fixture
def photos(tmp_path, face):
    """input/<identity>/<image> with a landmarks file naming each image relative to input/."""
    root = tmp_path / "input"
    lines, expected = [], {}
    for i, rel in enumerate(["alice/1.png", "alice/2.png", "bob/1.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        img, lmk = face.photo(i, size=(140, 120)), landmarks(i)
        cv2.imwrite(str(root / rel), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        text = [f"{v:.3f}" for v in lmk.ravel()]
        lines.append(f"{rel} {' '.join(text)}")
        expected[rel] = align_face(img, np.array(text, dtype=np.float32).reshape(5, 2))
    marks = tmp_path / "landmarks.txt"
    marks.write_text("\n".join(lines) + "\n")
    return root, marks, expected


def test_align_command_writes_the_crops(photos, tmp_path, capsys):
    root, marks, expected = photos
    out = tmp_path / "aligned"
    assert main(["align", f"input={root}", f"landmarks={marks}", f"out={out}"]) == 0
    assert "aligned 3 images" in capsys.readouterr().out
    for rel, crop in expected.items():
        written = cv2.cvtColor(cv2.imread(str(out / rel)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(written, crop)
    assert main(["align", f"input={root}", f"landmarks={marks}", f"out={out}"]) == 2  # never overwrites
    assert "exists; marginlab never overwrites" in capsys.readouterr().err


#: landmark numbers that used to give an all-black or meaningless crop with exit 0 (or an SVD traceback)
OFF_THE_IMAGE = {
    "1e30": "1e30 51 73 51 56 71 41 92 70 92",
    "1000 px off": "1038 1051 1073 1051 1056 1071 1041 1092 1070 1092",
    "1e39": "1e39 51 73 51 56 71 41 92 70 92",
}


@pytest.mark.parametrize(
    "damage,message",
    [
        ("short", r"landmarks.txt, line 2: expected 11 fields"),
        ("unreadable", r"landmarks.txt, line 3: cannot read image .*bob/1.png \(not a readable image\)"),
        ("outside", r"landmarks.txt, line 1: image \.\./x.png is not inside input="),
        ("no file", r"nope.txt: landmarks file not found"),
        ("1e30", r"landmarks.txt, line 2: landmark 1 \(x=1e\+30, y=51\) is off the 120x140 image: allowed"),
        ("1000 px off", r"landmarks.txt, line 2: landmark 1 \(x=1038, y=1051\) is off the 120x140 image"),
        ("1e39", r"landmarks.txt, line 2: the numbers must be finite \(within float32\)"),
    ],
)
def test_align_command_bad_input_is_one_line(photos, tmp_path, capsys, damage, message):
    root, marks, _ = photos
    lines = marks.read_text().splitlines()
    if damage == "short":
        lines[1] = " ".join(lines[1].split()[:-1])
    elif damage == "unreadable":
        (root / "bob" / "1.png").write_bytes(b"garbage")
    elif damage == "outside":
        lines[0] = "../x.png" + lines[0][len("alice/1.png") :]
    elif damage in OFF_THE_IMAGE:
        lines[1] = f"alice/2.png {OFF_THE_IMAGE[damage]}"
    marks.write_text("\n".join(lines) + "\n")
    given = tmp_path / "nope.txt" if damage == "no file" else marks
    assert main(["align", f"input={root}", f"landmarks={given}", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("marginlab: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()  # all or nothing: no crop of the lines before the bad one


def test_align_is_all_or_nothing_and_a_fixed_rerun_completes(photos, tmp_path, capsys):
    """A failure at line 3 used to leave the crops of lines 1-2, and the rerun was refused ("exists")."""
    root, marks, expected = photos
    good = (root / "bob" / "1.png").read_bytes()
    (root / "bob" / "1.png").write_bytes(b"garbage")
    out = tmp_path / "aligned"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["align", f"input={root}", f"landmarks={marks}", f"out={out}"]) == 2
    assert "line 3: cannot read image" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before  # no hidden folder left
    (root / "bob" / "1.png").write_bytes(good)
    assert main(["align", f"input={root}", f"landmarks={marks}", f"out={out}"]) == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "aligned"])


def test_align_into_an_existing_folder_adds_all_or_nothing(photos, tmp_path, capsys):
    root, marks, expected = photos
    out = tmp_path / "aligned"
    (out / "carol").mkdir(parents=True)
    (out / "carol" / "1.png").write_bytes(b"someone else's crop")
    kept = snapshot(out)
    (root / "bob" / "1.png").write_bytes(b"garbage")
    assert main(["align", f"input={root}", f"landmarks={marks}", f"out={out}"]) == 2
    assert snapshot(out) == kept and len(list(tmp_path.iterdir())) == 3  # input, landmarks.txt, aligned
    marks.write_text("".join(line + "\n" for line in marks.read_text().splitlines()[:2]))  # alice only
    assert main(["align", f"input={root}", f"landmarks={marks}", f"out={out}"]) == 0
    assert sorted(snapshot(out)) == ["alice/1.png", "alice/2.png", "carol/1.png"]
    written = cv2.cvtColor(cv2.imread(str(out / "alice" / "2.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(written, expected["alice/2.png"])
    assert len(list(tmp_path.iterdir())) == 3
