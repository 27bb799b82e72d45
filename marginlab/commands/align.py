"""``marginlab align input=<image folder> landmarks=<file> out=<folder>``: 112x112 ArcFace crops of your photos.

``landmarks``: one image per line, its path (relative to ``input``, or absolute; no spaces) then ten numbers
``x1 y1 ... x5 y5``: left eye, right eye, nose tip, left and right mouth corners, in pixels of that image (any
five-point detector gives them, e.g. ``insightface.app.FaceAnalysis`` -> ``face.kps``). Each image is warped by the
similarity transform that puts its five points on the ArcFace template (``marginlab.data.face.align``; the
alignment of InsightFace's training sets and of its IJB evaluation) and written to ``out`` under the same
relative path and format: ``input/alice/1.jpg`` -> ``out/alice/1.jpg``, so an ``<identity>/<image>`` tree stays
one and ``marginlab train dataset=casia dataset.root=<out>`` trains on it (a folder tree is detected;
``dataset.format=folder`` forces it). Landmarks must be finite and on their image (up to 10% of its size
outside; ``check_in_frame``). Options: ``progress=auto``. Existing files are never overwritten. All or nothing:
the crops are written into a hidden folder beside ``out`` and moved into it only when every image is aligned, so
a bad line leaves no crop behind and the fixed rerun starts clean.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from marginlab.command_args import REQUIRED, as_optional_bool, parse, run_command
from marginlab.errors import ConfigError, DataError, OutputError
from marginlab.files import exists_error, put_in_place, temp_beside, write_failed

_text = lambda k, v: v
SPEC = {
    "input": (REQUIRED, _text),
    "landmarks": (REQUIRED, _text),
    "out": (REQUIRED, _text),
    "progress": (None, as_optional_bool),
}


def plan(input_dir: Path, landmarks: Path, out_dir: Path) -> list[tuple[str, Path, Path, object]]:
    """(where, source image, target crop, landmarks) per line; every line checked before anything is written."""
    from marginlab.data.face.align import read_landmarks_file

    jobs, seen = [], {}
    for n, image, points, _ in read_landmarks_file(landmarks):
        where = f"{landmarks}, line {n}"
        source = Path(image) if Path(image).is_absolute() else input_dir / image
        try:
            relative = source.resolve().relative_to(input_dir.resolve())
        except ValueError:
            raise DataError(f"{where}: image {image} is not inside input={input_dir}") from None
        target = out_dir / relative
        if target in seen:
            raise DataError(f"{where}: image {image} is listed twice (also on line {seen[target]})")
        seen[target] = n
        if target.exists():
            raise exists_error(target)
        jobs.append((where, source, target, points))
    return jobs


def make_staging(out_dir: Path) -> Path:
    """A new hidden folder beside ``out_dir`` (the same file system: the crops are renamed, not copied)."""
    staging = temp_beside(out_dir)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"{staging.parent}: cannot write the crops there ({exc.strerror or exc})") from None
    return staging


def move_into(staging: Path, out_dir: Path, targets: list[Path]) -> None:
    """The finished crops from ``staging`` to ``out_dir``: one rename when ``out_dir`` is new, else crop by crop
    (``put_in_place``: never over a file that appeared meanwhile)."""
    if not out_dir.exists():
        try:
            os.rename(staging, out_dir)
            return
        except OSError:  # created meanwhile: crop by crop below
            pass
    for target in targets:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_failed(target.parent, exc) from None
        put_in_place(staging / target.relative_to(out_dir), target)


def align_folder(args: list[str]) -> Path:
    """Runs the command; returns the output folder."""
    from tqdm import tqdm

    from marginlab.data.face.align import align_face, opencv, read_image_rgb

    opts = parse("align", args, SPEC)
    input_dir, landmarks = Path(opts["input"]).expanduser(), Path(opts["landmarks"]).expanduser()
    out_dir = Path(opts["out"]).expanduser()
    if not input_dir.is_dir():
        raise ConfigError(f"input={opts['input']!r} is not allowed: give the folder of the images to align")
    if out_dir.resolve() == input_dir.resolve():
        raise ConfigError(f"out={opts['out']!r} is not allowed: it is the input folder; give another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"out={opts['out']!r} is a file; give a folder (new or existing) for the crops")
    jobs = plan(input_dir, landmarks, out_dir)
    cv2 = opencv()
    progress = sys.stderr.isatty() if opts["progress"] is None else opts["progress"]
    staging = make_staging(out_dir)
    try:
        for where, source, target, points in tqdm(jobs, desc="align", unit="image", disable=not progress):
            image = read_image_rgb(source, where)
            try:
                crop = align_face(image, points)
            except ValueError as exc:
                raise DataError(f"{where}: {exc}") from None
            staged = staging / target.relative_to(out_dir)
            try:
                staged.parent.mkdir(parents=True, exist_ok=True)
                written = cv2.imwrite(str(staged), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            except (OSError, cv2.error) as exc:
                raise write_failed(target, str(exc)) from None
            if not written:
                raise write_failed(target, f"OpenCV knows no image format for {target.suffix!r}")
        move_into(staging, out_dir, [target for _, _, target, _ in jobs])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"marginlab: aligned {len(jobs)} image{'s' if len(jobs) != 1 else ''} to 112x112 in {out_dir}")
    return out_dir


def main(args: list[str]) -> int:
    return run_command(__doc__, align_folder, args)
