"""``marginlab export checkpoint=<run dir | .pt | .pth> [format=onnx|torchscript|state_dict|insightface] [out=<file>]``.

Writes the checkpoint's backbone (not its head: a face model is its embedding) in eval mode with fp32 weights,
and ``<file>.json`` beside it: input size, channels, colour order, normalisation, embedding size, the training
config's head and data set, and the self-check. The written file is read back and run on a random batch; when
it differs from PyTorch by more than 1e-4 (relative) nothing is kept and the command fails. Without ``out=`` the
file goes next to the checkpoint (``checkpoints/best.onnx``); an existing file is never overwritten: a default
name that is taken becomes ``best-1.onnx``, ``-2``, ...; a given ``out=`` that exists is refused.
``format=insightface``: an IResNet's state dict under InsightFace arcface_torch's key names (``conv1``, ``bn1``,
``prelu``, ``layer1.0.bn1``, ..., ``fc``, ``features``), what their ``iresnet50().load_state_dict`` takes (a
MobileFaceNet's under theirs, for ``get_mbf(...).load_state_dict``). A bare
backbone state dict as ``checkpoint=`` (InsightFace's ``backbone.pth``) needs ``backbone=<name>`` (e.g. iresnet50)
and ``image_size=`` (default 112).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from marginlab.checks import image_hw
from marginlab.command_args import REQUIRED, STATE_DICT_OPTIONS, one_of, parse
from marginlab.export.formats import FORMATS, insightface_problems, random_batch
from marginlab.export.model_card import is_face_model, model_card
from marginlab.files import check_writable, dumps, free_path, put_in_place, refuse_existing, staged, write_text
from marginlab.training.checkpoint import find_checkpoint
from marginlab.training.weights import load_backbone

SIDECAR = ".json"
SPEC = {
    "checkpoint": (REQUIRED, lambda k, v: v),
    "format": ("onnx", one_of(*FORMATS)),
    "out": (None, lambda k, v: v),
    **STATE_DICT_OPTIONS,
}


def destination(out: str | None, checkpoint: Path, suffix: str) -> tuple[Path, str | None]:
    """Where the export goes, and a note when the default name was taken."""
    if out is not None:
        path = Path(out).expanduser()
        refuse_existing(path, Path(f"{path}{SIDECAR}"))
        return path, None
    default = checkpoint.with_name(checkpoint.stem + suffix)
    path = free_path(default, suffix, companions=(SIDECAR,))
    return path, None if path == default else f"{default} exists; writing {path.name} instead"


def export(args: list[str]) -> dict:
    """Runs the command; returns the sidecar it wrote."""
    opts = parse("export", args, SPEC)
    suffix, writer = FORMATS[opts["format"]]
    target, note = destination(opts["out"], find_checkpoint(opts["checkpoint"]), suffix)
    check_writable(target.parent, "; give out=<a file in a writable folder>")  # before the model is built
    backbone, ckpt, path = load_backbone(opts["checkpoint"], backbone=opts["backbone"], image_size=opts["image_size"])
    if note:
        print(f"marginlab: {note}")
    backbone = backbone.float()
    name = f"backbone {ckpt['config']['backbone'].get('_target_')}"
    height, width = image_hw(ckpt["data"]["image_size"])
    example = random_batch(2, (int(ckpt["data"]["in_channels"]), height, width), seed=0)
    with torch.no_grad():
        embedding_size = int(backbone(example).shape[1])
    start = time.perf_counter()
    with staged(target) as tmp:
        check = writer(backbone, example, tmp, name)
        check["seconds"] = round(time.perf_counter() - start, 3)
        if opts["format"] == "onnx" and is_face_model(ckpt):
            problems = insightface_problems(tmp, height, width)
            check["insightface_recognition_model"] = not problems
            check["insightface_problems"] = problems
        card = model_card(opts["format"], target.name, ckpt, str(path), embedding_size, check)
        put_in_place(tmp, target)
    write_text(Path(f"{target}{SIDECAR}"), dumps(card, indent=2) + "\n")  # strict JSON (files.py)
    print(
        f"marginlab: wrote {target} and {target.name}{SIDECAR} ({opts['format']}, input "
        f"[N, {card['input']['channels']}, {height}, {width}], embedding {embedding_size}; checked: max relative "
        f"error {check['max_relative_error']:.1e}, {check['seconds']:.1f} s)"
    )
    return card
