"""Weights from files into models: a checkpoint's backbone (``eval``, ``export``, ``embed``) and ``init_from=``."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from marginlab.errors import ConfigError, DataError
from marginlab.training.checkpoint import EVAL_KEYS, find_checkpoint, read_checkpoint, state_differences

BACKBONE = "backbone."


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


#: the prefix torch's DataParallel / DistributedDataParallel wrappers put on every key of a ``state_dict()``
WRAPPER_PREFIX = "module."


def without_wrapper_prefix(state: dict) -> dict:
    """A state dict saved from a DataParallel / DDP wrapper (every key under ``module.``) without that prefix, as
    the unwrapped model's ``state_dict()`` names them; any other state dict unchanged."""
    if state and all(isinstance(k, str) and k.startswith(WRAPPER_PREFIX) for k in state):
        return strip_prefix(state, WRAPPER_PREFIX)
    return state


#: what a file's backbone config (a checkpoint's, an export's sidecar) may name as ``_target_``: a file never chooses
#: which code runs (hydra.utils.instantiate would call any importable callable it names, with its arguments)
BACKBONE_TARGETS = "marginlab.backbones."


def check_backbone_node(node, source) -> None:
    """A DataError naming ``source`` unless ``node`` is a backbone config whose every ``_target_`` is a marginlab
    backbone and whose strings hold no ``${...}`` (a saved config is resolved; a resolver could create files)."""
    if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
        raise DataError(f"{source}: no backbone config (a mapping with a _target_); not a marginlab checkpoint")
    stack = [node]
    while stack:
        item = stack.pop()
        values = list(item.values()) if isinstance(item, dict) else list(item) if isinstance(item, list) else [item]
        if isinstance(item, dict) and "_target_" in item and not str(item["_target_"]).startswith(BACKBONE_TARGETS):
            raise DataError(
                f"{source}: its backbone config names _target_={item['_target_']!r}; a file may name only a "
                f"marginlab backbone ({BACKBONE_TARGETS}*): nothing was run. For a backbone of your own, build it "
                "in Python, load into it the file's 'model' entries under 'backbone.' (marginlab.training.checkpoint."
                "read_checkpoint) and evaluate it with marginlab.eval.verification_sets.VerificationTarget.run"
            )
        if isinstance(item, str) and "${" in item:
            raise DataError(f"{source}: its backbone config holds an interpolation {item!r}; nothing was run")
        if isinstance(item, (dict, list)):
            stack.extend(values)


def meta_state(node, **size) -> dict:
    """The state dict (key -> tensor on the meta device: shape and dtype, no storage) of the module ``node`` builds:
    nothing is allocated, so a config asking for a huge model is refused before it is built for real."""
    node = OmegaConf.create(node)
    importlib.import_module(node._target_.rpartition(".")[0])  # imported outside the meta device's scope
    with torch.device("meta"):
        return instantiate(node, **size).state_dict()


def build_backbone(path: Path, ckpt: dict) -> nn.Module:
    """The backbone a marginlab checkpoint's own config builds, holding its weights, on the CPU in eval mode."""
    data = ckpt["data"]
    check_backbone_node(ckpt["config"].get("backbone") if isinstance(ckpt["config"], dict) else None, path)
    node = OmegaConf.create(ckpt["config"]["backbone"])
    size = {"in_channels": data["in_channels"], "image_size": data["image_size"]}
    try:
        shapes = {k: list(v.shape) for k, v in meta_state(node, **size).items()}
    except Exception as exc:  # noqa: BLE001 - one line naming the file
        why = " ".join(str(exc).split())[:300]  # Hydra's first line only names the target; the cause follows
        raise DataError(f"{path}: its backbone config cannot be built: {type(exc).__name__}: {why}") from None
    state = strip_prefix(ckpt["model"], BACKBONE)
    differences = state_differences(shapes, state)
    if differences:
        raise ConfigError(
            f"{path}: its weights do not fit the backbone its config builds "
            f"({ckpt['config']['backbone'].get('_target_')}):\n  " + "\n  ".join(differences)
        )
    backbone = instantiate(node, **size)
    backbone.load_state_dict(state)
    return backbone.eval()


def load_backbone(value, key: str = "checkpoint", backbone=None, image_size=None) -> tuple[nn.Module, dict, Path]:
    """(backbone in eval mode on the CPU, the checkpoint, its path) from a checkpoint file, a run directory, or a
    bare backbone state dict (InsightFace arcface_torch's ``.pth``, ``marginlab export format=state_dict``) with
    ``backbone`` naming its architecture (see ``state_dict_checkpoint``)."""
    path = find_checkpoint(value, key)
    ckpt = read_checkpoint(path, required=())
    if is_state_dict(ckpt):
        ckpt = state_dict_checkpoint(path, ckpt, backbone, image_size)
    else:
        if backbone is not None or image_size is not None:
            given = "backbone=" if backbone is not None else "image_size="
            raise ConfigError(
                f"{given} is only for a bare state dict; {path} is a marginlab checkpoint that names "
                f"its own architecture and input: leave {given} out"
            )
        missing = [k for k in EVAL_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        if missing:
            raise DataError(
                f"{path}: not a marginlab checkpoint (no {', '.join(repr(k) for k in missing)} entries) "
                f"nor a state dict of tensors"
            )
    return build_backbone(path, ckpt), ckpt, path


# ---------------------------------------------------------------- bare state dicts
#: the input of a bare state dict that has no sidecar: InsightFace's models take 112x112 RGB crops
STATE_DICT_INPUT = {"in_channels": 3, "image_size": 112}
SIDECAR = ".json"  # marginlab export's card beside the file: the backbone config and the input


def is_state_dict(obj) -> bool:
    """A bare state dict: a non-empty mapping of names to tensors (no ``model`` / ``config`` entries)."""
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def backbone_configs() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "backbone").glob("*.yaml"))


def backbone_node(name: str) -> dict:
    """``configs/backbone/<name>.yaml`` as a plain dict; a ConfigError naming the choices for an unknown name."""
    path = Path(__file__).parents[1] / "configs" / "backbone" / f"{name}.yaml"
    if not str(name).replace("_", "").isalnum() or not path.is_file():
        raise ConfigError(f"backbone={name!r} is not allowed: choose one of {', '.join(backbone_configs())}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _sidecar(path: Path) -> dict | None:
    """The card ``marginlab export`` wrote beside a state dict, when there is one naming its backbone."""
    card_path = Path(f"{path}{SIDECAR}")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) and isinstance(card.get("backbone"), dict) else None


def state_dict_checkpoint(path: Path, state: dict, backbone=None, image_size=None) -> dict:
    """A checkpoint-shaped record (``model``, ``config``, ``data``) for a bare backbone state dict, so that
    ``eval``, ``embed`` and ``export`` treat it as a checkpoint. Its architecture: ``backbone`` (a name of
    ``configs/backbone``, or a config node), else the sidecar ``marginlab export`` wrote beside it; its keys:
    ours, or InsightFace arcface_torch's (``backbones/insightface_keys.py``), whichever fits more of them. Input:
    ``image_size`` (default the sidecar's, else 112: InsightFace's), RGB. One line when it does not fit."""
    from marginlab.backbones.insightface_keys import from_insightface

    wrapped = without_wrapper_prefix(state) is not state
    state = without_wrapper_prefix(state)
    card = _sidecar(path) if backbone is None else None
    if backbone is None and card is None:
        raise ConfigError(
            f"{path} is a bare state dict (no config names its architecture): give backbone=<name>, "
            f"e.g. backbone=iresnet50 for InsightFace's ms1mv3_arcface_r50 backbone.pth (one of "
            f"{', '.join(backbone_configs())})"
        )
    if card is not None:
        check_backbone_node(card["backbone"], f"{path}{SIDECAR}")  # a foreign file: it may not pick what runs
        node, label = card["backbone"], f"the backbone of {path.name}{SIDECAR}"
        channels = int(card.get("input", {}).get("channels", 3))
        size = image_size or [card["input"]["height"], card["input"]["width"]]
        dataset = card.get("dataset")
    else:
        node = (
            backbone_node(backbone)
            if isinstance(backbone, str)
            else OmegaConf.to_container(OmegaConf.create(backbone), resolve=True)
        )
        label = f"backbone={backbone}" if isinstance(backbone, str) else f"backbone ({node.get('_target_')})"
        channels, size, dataset = STATE_DICT_INPUT["in_channels"], image_size or STATE_DICT_INPUT["image_size"], None
    from marginlab.data.face import parse_image_size

    height, width = parse_image_size(size, "image_size")
    size = height if height == width else [height, width]
    try:
        model_state = meta_state(node, in_channels=channels, image_size=size)  # shapes only: built for real later
    except Exception as exc:  # noqa: BLE001 - one line naming the architecture
        raise ConfigError(
            f"{label} cannot be built for a {channels}x{height}x{width} input: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    expected = {k: list(v.shape) for k, v in model_state.items()}
    theirs = from_insightface(state)
    layout, keys = max((("marginlab", state), ("insightface", theirs)), key=lambda c: len(expected.keys() & c[1]))
    counters = {  # a fresh module's value (0), on the CPU
        k: torch.zeros(v.shape, dtype=v.dtype)
        for k, v in model_state.items()
        if k.endswith("num_batches_tracked") and k not in keys
    }
    mapped, keys = keys, {**keys, **counters}  # BatchNorm's step counters, which some files leave out, play no part
    differences = state_differences(expected, keys)
    if differences:
        from marginlab.backbones.insightface_keys import mobilefacenet_blocks

        first = key_mismatch(expected, mapped) or differences[0]
        first = first if len(first) <= 300 else first[:300] + " ..."
        count = f"{len(differences)} difference{'s' if len(differences) > 1 else ''}"
        mbf = (
            " (InsightFace's get_mbf is backbone=mbf, get_mbf_large backbone=mbf_large)"
            if mobilefacenet_blocks(state)
            else ""
        )
        raise ConfigError(
            f"{path} does not fit {label} at a {height}x{width} input ({count}, e.g. {first}): give "
            f"the backbone= and image_size= these weights were trained with{mbf}"
        )
    return {
        "model": {BACKBONE + k: v for k, v in keys.items()},
        "config": {"backbone": node, "dataset": dataset, "head": None},
        "data": {"in_channels": channels, "image_size": size, "num_classes": None},
        "state": {},
        "weights": {"file": str(path), "layout": layout, "face": card is None, "data_parallel_prefix": wrapped},
    }


def _first_keys(keys: list[str], first: int) -> str:
    return ", ".join(keys[:first]) + (", ..." if len(keys) > first else "")


def key_mismatch(expected: dict, saved: dict, first: int = 3) -> str | None:
    """What a ``saved`` state whose keys (read as ours or as InsightFace arcface_torch's) are not the model's
    ``expected`` ones lacks and has too, naming the first keys of each; None when the keys are the same. BatchNorm's
    step counters are left out (they play no part in eval, and some files leave them out)."""
    expected = [k for k in expected if not k.endswith("num_batches_tracked")]
    saved = [k for k in saved if not k.endswith("num_batches_tracked")]
    unmatched = [k for k in saved if k not in set(expected)]
    missing = [k for k in expected if k not in set(saved)]
    parts = []
    if unmatched:
        parts.append(
            f"{len(unmatched)} of its {len(saved)} keys, neither marginlab's nor InsightFace's names of the "
            f"model's tensors: {_first_keys(unmatched, first)}"
        )
    if missing:
        parts.append(f"{len(missing)} of the model's {len(expected)} tensors not in it: {_first_keys(missing, first)}")
    return "; ".join(parts) or None


# ---------------------------------------------------------------- init_from
def _module_groups(keys) -> list[str]:
    """The prefixes loaded all-or-nothing: ``head.`` and each ``regularizers.<name>.`` (the backbone is apart)."""
    groups = []
    for k in keys:
        if k.startswith(BACKBONE):
            continue
        parts = k.split(".")
        prefix = ".".join(parts[: 2 if parts[0] == "regularizers" else 1]) + "."
        if prefix not in groups:
            groups.append(prefix)
    return groups


def _module(model: nn.Module, prefix: str) -> nn.Module:
    return model.get_submodule(prefix.rstrip("."))


def _saved_model_state(path: Path, ckpt, backbone_keys: set[str]) -> dict:
    """``model`` of a marginlab checkpoint, or a bare backbone state dict (``marginlab export format=state_dict``,
    InsightFace arcface_torch's ``backbone.pth``) under the ``backbone.`` prefix."""
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        from marginlab.backbones.insightface_keys import from_insightface

        ckpt = without_wrapper_prefix(ckpt)  # (saved from a DataParallel / DDP wrapper)
        state = max((ckpt, from_insightface(ckpt)), key=lambda s: len(backbone_keys & set(s)))  # ours or theirs
        return {BACKBONE + k: v for k, v in state.items()}
    raise DataError(f"{path}: not a marginlab checkpoint nor a state dict of tensors (no 'model' entry)")


def _describe(key: str, saved: dict, expected: dict) -> str:
    shape = list(saved[key].shape) if key in saved else None
    return f"{key} {expected[key]}" + (f" (saved {shape})" if shape is not None else " (not in the checkpoint)")


def init_from(model: nn.Module, value, head: bool | None = None) -> str:
    """Copies a checkpoint's weights (not its optimizer or schedule) into a freshly built ``MarginModel``: the
    backbone always; the head and each regularizer when ``head`` is true, or None and their tensors fit. Returns
    the line to print, naming every tensor left as initialised."""
    from marginlab.distributed import sharded_state
    from marginlab.distributed.partial_fc import PartialFC

    path = find_checkpoint(value, "init_from")
    ckpt = read_checkpoint(path, required=())
    expected = sharded_state.unsharded_shapes(model)
    backbone_keys = set(strip_prefix(expected, BACKBONE))
    saved = _saved_model_state(path, ckpt, backbone_keys)
    fits = {k for k, v in saved.items() if torch.is_tensor(v) and k in expected and list(v.shape) == expected[k]}
    want = {k: s for k, s in expected.items() if k.startswith(BACKBONE)}
    if not fits & set(want):
        raise DataError(
            f"{path}: none of its {len(saved)} tensors fits this model's backbone "
            f"({type(model.backbone).__name__}): not a checkpoint of this architecture "
            f"({key_mismatch(want, saved)})"
        )
    saved_backbone = {k: v for k, v in saved.items() if k.startswith(BACKBONE)}
    differences = state_differences(want, saved_backbone)
    if differences:
        raise ConfigError(
            f"init_from={value!r}: the backbone in {path} does not fit this model's "
            f"({type(model.backbone).__name__}; {len(differences)} differences): "
            f"{key_mismatch(want, saved_backbone) or differences[0]}"
        )
    model.backbone.load_state_dict(strip_prefix(saved, BACKBONE))
    loaded, skipped = [f"backbone ({len(want)} tensors)"], []
    for prefix in _module_groups(expected):
        keys = [k for k in expected if k.startswith(prefix)]
        group_fits = all(k in fits for k in keys)
        if head and not group_fits:
            bad = next(k for k in keys if k not in fits)
            raise ConfigError(
                f"init_from_head=true: {prefix.rstrip('.')} of {path} does not fit this model: "
                f"{_describe(bad, saved, expected)}; set init_from_head=false to start it afresh"
            )
        if head is False or not group_fits:
            skipped += [_describe(k, saved, expected) for k in keys]
            continue
        module, state = _module(model, prefix), strip_prefix(saved, prefix)
        module.load_full_state_dict(state) if isinstance(module, PartialFC) else module.load_state_dict(state)
        loaded.append(f"{prefix.rstrip('.')} ({len(keys)} tensors)")
    unused = [k for k in saved if k not in expected]
    line = f"marginlab: init_from {path}: loaded {', '.join(loaded)}"
    if skipped:
        why = "init_from_head=false" if head is False else "they do not fit"
        line += f"; not loaded ({why}), left as initialised: {', '.join(skipped)}"
    if unused:
        line += f"; not in this model: {', '.join(unused)}"
    return line
