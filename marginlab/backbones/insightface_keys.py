"""InsightFace arcface_torch state-dict keys renamed to marginlab's, for their IResNet
(``recognition/arcface_torch/backbones/iresnet.py`` -> ``backbones/iresnet.py``) and their MobileFaceNet
(``backbones/mobilefacenet.py`` -> ``backbones/mobilefacenet.py``): same tensors and shapes, other module names. The
two layouts share no key, so ``from_insightface`` renames either.

IResNet, theirs -> ours: ``conv1, bn1, prelu`` -> ``stem.0, stem.1, stem.2``; ``layer<i>.<j>.{bn1, conv1, bn2, prelu,
conv2, bn3}`` -> ``stages.<i-1>.<j>.body.{0..5}``; ``layer<i>.<j>.downsample.{0,1}`` ->
``stages.<i-1>.<j>.downsample.{0,1}``; ``bn2, fc, features`` keep their names.

MobileFaceNet, theirs -> ours (``mobilefacenet_units``): their conv-BN(-PReLU) units ``<unit>.layers.{0,1,2}`` are our
``Sequential``s ``<unit>.{0,1,2}``; ``layers.0`` (stem) and ``layers.1`` (a ConvBlock when ``blocks[0]`` is 1, else a
Residual) open our flat ``features``; each of their DepthWise ``layers.<l>.layers.{0,1,2}`` and each block ``k`` of a
Residual ``layers.<l>.layers.<k>.layers.{0,1,2}`` is our next ``features.<n>.body.{0,1,2}``; ``conv_sep`` is the last
``features.<n>``; their GDC ``features.layers.{0, 2, 3}`` is our ``gdc``, ``embed``, ``bn``.
"""

from __future__ import annotations

import re

STEM = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2"}
BLOCK = {
    "bn1": "body.0",
    "conv1": "body.1",
    "bn2": "body.2",
    "prelu": "body.3",
    "conv2": "body.4",
    "bn3": "body.5",
    "downsample": "downsample",
}
SAME = ("bn2", "fc", "features")
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.([a-z0-9]+)\.(.+)")


def key_from_insightface(key: str) -> str | None:
    """Our key for one of their IResNet's; None when it names nothing of an IResNet."""
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        layer, index, name, rest = block.groups()
        return f"stages.{int(layer) - 1}.{index}.{BLOCK[name]}.{rest}" if name in BLOCK else None
    module, _, rest = key.partition(".")
    if module in STEM:
        return f"{STEM[module]}.{rest}"
    return key if module in SAME else None


# ---------------------------------------------------------------- MobileFaceNet
#: their top-level ``layers.<l>`` after the stem and the second layer: a stride-2 DepthWise, then a Residual of
#: ``blocks[1]``, ``blocks[2]``, ``blocks[3]`` blocks
MOBILEFACENET_STAGES = ((2, 3), (4, 5), (6, 7))
_RESIDUAL_BLOCK = re.compile(r"layers\.(\d+)\.layers\.(\d+)\.layers\.\d+\.layers\.")


def mobilefacenet_blocks(state) -> tuple[int, int, int, int] | None:
    """Their ``blocks`` read off the keys of their MobileFaceNet state dict; None when it holds none of its keys."""
    if not any(k.startswith("conv_sep.") for k in state):
        return None
    counts: dict[int, set[str]] = {}
    for key in state:
        block = _RESIDUAL_BLOCK.match(key)
        if block:
            counts.setdefault(int(block.group(1)), set()).add(block.group(2))
    first = 1 if "layers.1.layers.0.weight" in state else len(counts.get(1, ()))
    return (first, *(len(counts.get(residual, ())) for _, residual in MOBILEFACENET_STAGES))


def mobilefacenet_units(blocks) -> dict[str, str]:
    """Their module prefix -> ours, for each conv-BN(-PReLU) unit, the embedding Linear and its BatchNorm1d of a
    MobileFaceNet with ``blocks`` (their ``blocks``, our ``backbone.blocks``)."""
    units = {"layers.0.layers": "features.0"}
    n = 1
    if blocks[0] == 1:
        units["layers.1.layers"], n = "features.1", 2
    else:
        for k in range(blocks[0]):
            units.update({f"layers.1.layers.{k}.layers.{j}.layers": f"features.{n + k}.body.{j}" for j in range(3)})
        n += blocks[0]
    for (depthwise, residual), repeats in zip(MOBILEFACENET_STAGES, blocks[1:]):
        units.update({f"layers.{depthwise}.layers.{j}.layers": f"features.{n}.body.{j}" for j in range(3)})
        n += 1
        for k in range(repeats):
            units.update(
                {f"layers.{residual}.layers.{k}.layers.{j}.layers": f"features.{n + k}.body.{j}" for j in range(3)}
            )
        n += repeats
    units["conv_sep.layers"] = f"features.{n}"
    units.update({"features.layers.0.layers": "gdc", "features.layers.2": "embed", "features.layers.3": "bn"})
    return units


def rename_units(state: dict, units: dict[str, str]) -> dict:
    """``state`` with each key under a prefix of ``units`` moved under that prefix's value; other keys as they are."""
    out = {}
    for key, value in state.items():
        unit, _, param = key.rpartition(".")
        if unit not in units:  # a conv-BN-PReLU unit's tensor: <unit>.<index>.<param>
            head, _, index = unit.rpartition(".")
            unit, param = (head, f"{index}.{param}") if head in units else (unit, param)
        out[f"{units[unit]}.{param}" if unit in units else key] = value
    return out


# ---------------------------------------------------------------- either
def from_insightface(state: dict) -> dict:
    """Their state dict (an IResNet's or a MobileFaceNet's) under our keys; a key that names nothing of either is
    kept as it is."""
    blocks = mobilefacenet_blocks(state)
    if blocks is not None:
        return rename_units(state, mobilefacenet_units(blocks))
    return {key_from_insightface(k) or k: v for k, v in state.items()}


def mobilefacenet_to_insightface(state: dict, blocks) -> tuple[dict, list[str]]:
    """(our MobileFaceNet's state dict with ``blocks`` under their keys, our keys that have no counterpart in theirs):
    the inverse of ``from_insightface`` for a MobileFaceNet."""
    ours_to_theirs = {ours: theirs for theirs, ours in mobilefacenet_units(blocks).items()}
    pairs = list(zip(state, rename_units(state, ours_to_theirs)))
    return {theirs: state[ours] for ours, theirs in pairs if theirs != ours}, [o for o, t in pairs if t == o]
