"""InsightFace arcface_torch IResNet state-dict keys (``recognition/arcface_torch/backbones/iresnet.py``) renamed to
marginlab's IResNet (``backbones/iresnet.py``): same tensors and shapes, other module names.

Theirs -> ours: ``conv1, bn1, prelu`` -> ``stem.0, stem.1, stem.2``; ``layer<i>.<j>.{bn1, conv1, bn2, prelu, conv2,
bn3}`` -> ``stages.<i-1>.<j>.body.{0..5}``; ``layer<i>.<j>.downsample.{0,1}`` -> ``stages.<i-1>.<j>.downsample.{0,1}``;
``bn2, fc, features`` keep their names.
"""

from __future__ import annotations

import re

STEM = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2"}
BLOCK = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "prelu": "body.3", "conv2": "body.4", "bn3": "body.5",
         "downsample": "downsample"}
SAME = ("bn2", "fc", "features")
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.([a-z0-9]+)\.(.+)")


def key_from_insightface(key: str) -> str | None:
    """Our key for one of theirs; None when it names nothing of an IResNet."""
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        layer, index, name, rest = block.groups()
        return f"stages.{int(layer) - 1}.{index}.{BLOCK[name]}.{rest}" if name in BLOCK else None
    module, _, rest = key.partition(".")
    if module in STEM:
        return f"{STEM[module]}.{rest}"
    return key if module in SAME else None


def from_insightface(state: dict) -> dict:
    """Their state dict under our keys; a key that names nothing of an IResNet is kept as it is."""
    return {key_from_insightface(k) or k: v for k, v in state.items()}
