"""marginlab IResNet state-dict keys back to InsightFace arcface_torch's (``recognition/arcface_torch/backbones/
iresnet.py``): the inverse of ``marginlab.backbones.insightface_keys`` (same tensors and shapes, their names)."""

from __future__ import annotations

import re

from marginlab.backbones.insightface_keys import BLOCK, SAME, STEM

STEM_BACK = {ours: theirs for theirs, ours in STEM.items()}
BLOCK_BACK = {ours: theirs for theirs, ours in BLOCK.items()}
_OUR_BLOCK_KEY = re.compile(r"stages\.([0-3])\.(\d+)\.(body\.\d|downsample)\.(.+)")
_OUR_STEM_KEY = re.compile(r"(stem\.\d)\.(.+)")


def key_to_insightface(key: str) -> str | None:
    """Their key for one of ours; None when it names nothing of their IResNet."""
    block = _OUR_BLOCK_KEY.fullmatch(key)
    if block:
        stage, index, name, rest = block.groups()
        return f"layer{int(stage) + 1}.{index}.{BLOCK_BACK[name]}.{rest}" if name in BLOCK_BACK else None
    stem = _OUR_STEM_KEY.fullmatch(key)
    if stem:
        return f"{STEM_BACK[stem.group(1)]}.{stem.group(2)}" if stem.group(1) in STEM_BACK else None
    return key if key.partition(".")[0] in SAME else None


def to_insightface(state: dict) -> tuple[dict, list[str]]:
    """(our state dict under their keys, our keys that have no counterpart in theirs)."""
    out, left = {}, []
    for key, value in state.items():
        theirs = key_to_insightface(key)
        if theirs is None:
            left.append(key)
        else:
            out[theirs] = value
    return out, left
