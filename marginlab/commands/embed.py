"""``marginlab embed checkpoint=<run dir | .pt | .pth> input=<image folder | .rec | .bin> out=<file.npy>``: embeddings.

Rows are L2-normalised, as in verification. Options: ``flip=true`` (the embedding of an image plus that of its
mirror image, as verification; ``flip=false``: the image alone), ``batch_size=256``, ``num_workers=0``,
``device=auto``, ``progress=auto`` (a progress bar on a terminal). A bare backbone state dict (InsightFace
arcface_torch's ``backbone.pth``, ``marginlab export format=state_dict``) needs ``backbone=<name>`` (e.g.
``iresnet50``) unless an export's ``.json`` sidecar lies beside it; ``image_size=`` (default 112) its input.
Images are read as in training (``marginlab.data.face``: decoded to RGB, fitted to the model's input size,
``(x / 255 - 0.5) / 0.5``) and embedded in batches straight into ``out`` (float32, N x D, a memory-mapped .npy:
never all images in memory). ``<out stem>.tsv`` lists the rows in the same order: an image folder gives each
image's path (relative to the folder), label and identity folder; a ``.rec`` (with its ``.idx``) the record key
and label; a ``.bin`` the pair and whether it is a same-identity pair. Existing files are never overwritten.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from marginlab.command_args import (
    REQUIRED,
    STATE_DICT_OPTIONS,
    as_bool,
    as_count,
    as_optional_bool,
    as_positive_int,
    parse,
    run_command,
)
from marginlab.data.face import FaceImageDataset, parse_image_size
from marginlab.errors import ConfigError
from marginlab.eval.verification import embed_images
from marginlab.files import check_writable, put_in_place, refuse_existing, staged, write_text

_text = lambda k, v: v  # noqa: E731
SPEC = {
    "checkpoint": (REQUIRED, _text),
    "input": (REQUIRED, _text),
    "out": (REQUIRED, _text),
    "flip": (True, as_bool),
    "batch_size": (256, as_positive_int),
    "num_workers": (0, as_count),
    "device": ("auto", _text),
    "progress": (None, as_optional_bool),
    **STATE_DICT_OPTIONS,
}


class EncodedImages(FaceImageDataset):
    """Encoded images held as bytes (a ``.bin``), decoded one by one as the loader asks."""

    def __init__(self, sources: list[bytes], path: Path, image_size: tuple[int, int]):
        super().__init__(image_size, train=False)
        self.sources, self.path = sources, path

    def __len__(self) -> int:
        return len(self.sources)

    def describe(self, index: int) -> str:
        return f"{self.path}: image {index} (pair {index // 2})"

    def raw(self, index: int) -> tuple[bytes, int]:
        return self.sources[index], 0


def open_input(value: str, image_size: tuple[int, int]) -> tuple[FaceImageDataset, list[str], list[str]]:
    """(dataset of evaluation images, index header, index rows) of an image folder, a ``.rec`` or a ``.bin``."""
    path = Path(value).expanduser()
    if path.is_dir():
        from marginlab.data.face.imagefolder import FolderIndex

        index = FolderIndex(path)
        rows = [
            f"{i}\t{Path(p).relative_to(path).as_posix()}\t{label}\t{index.classes[label]}"
            for i, (p, label) in enumerate(zip(index.paths, index.labels))
        ]
        return index.dataset(None, image_size, train=False), ["index", "path", "label", "identity"], rows
    if path.suffix == ".rec":
        from marginlab.data.face.recordio import open_face_records

        records = open_face_records(path, path.with_suffix(".idx"))
        rows = [f"{i}\t{int(k)}\t{int(label)}" for i, (k, label) in enumerate(zip(records.keys, records.labels))]
        return records.dataset(None, image_size, train=False), ["index", "key", "label"], rows
    if path.suffix == ".bin":
        from marginlab.eval.verification_sets import read_bin

        sources, issame = read_bin(path)
        rows = [f"{i}\t{i // 2}\t{int(issame[i // 2])}" for i in range(len(sources))]
        return EncodedImages(sources, path, image_size), ["index", "pair", "issame"], rows
    raise ConfigError(
        f"input={value!r} is not allowed: give an image folder (<root>/<identity>/<image>), a .rec "
        f"(with its .idx beside it) or a verification .bin"
    )


def index_path(out: Path) -> Path:
    return out.with_suffix(".tsv")


def embed(args: list[str]) -> Path:
    """Runs the command; returns the .npy it wrote."""
    from tqdm import tqdm

    from marginlab.device import resolve_device
    from marginlab.eval.standalone import check_fits_verification
    from marginlab.training.checkpoint import find_checkpoint
    from marginlab.training.weights import load_backbone

    opts = parse("embed", args, SPEC)
    out = Path(opts["out"]).expanduser()
    if out.suffix != ".npy":
        raise ConfigError(
            f"out={opts['out']!r} is not allowed: give a .npy file (the index goes to "
            f"{index_path(out.with_suffix('.npy')).name} beside it)"
        )
    refuse_existing(out, index_path(out))
    check_writable(out.parent, "; give out=<a .npy in a writable folder>")  # before any image is embedded
    device = resolve_device(str(opts["device"]))
    path = find_checkpoint(opts["checkpoint"])
    backbone, ckpt, _ = load_backbone(path, backbone=opts["backbone"], image_size=opts["image_size"])
    check_fits_verification(path, ckpt["data"])
    backbone = backbone.to(device)
    size = parse_image_size(ckpt["data"]["image_size"], "image_size")
    dataset, header, rows = open_input(opts["input"], size)
    loader = DataLoader(dataset, batch_size=opts["batch_size"], num_workers=opts["num_workers"], shuffle=False)
    dim = int(backbone.embedding_dim) if hasattr(backbone, "embedding_dim") else None
    progress = sys.stderr.isatty() if opts["progress"] is None else opts["progress"]
    with staged(out) as tmp:
        matrix = None
        done = 0
        for images, _ in tqdm(loader, desc="embed", unit="batch", disable=not progress):
            emb = embed_images(backbone, images, batch_size=len(images), flip=opts["flip"], device=device).numpy()
            if matrix is None:
                dim = emb.shape[1]
                matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(dataset), dim))
            matrix[done : done + len(emb)] = emb
            done += len(emb)
        if matrix is None:
            raise ConfigError(f"input={opts['input']!r} holds no image")
        matrix.flush()
        del matrix
        put_in_place(tmp, out)
    write_text(index_path(out), "\t".join(header) + "\n" + "".join(f"{row}\n" for row in rows))
    print(
        f"marginlab: wrote {out} ({done} x {dim} float32, L2-normalised, flip={str(opts['flip']).lower()}) "
        f"and {index_path(out).name}"
    )
    return out


def main(args: list[str]) -> int:
    return run_command(__doc__, embed, args)
