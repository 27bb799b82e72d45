"""Weights from files into models: a checkpoint's backbone (``eval``, ``export``, ``embed``) and ``init_from=``."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from marginlab.checkpoint import CHECKPOINT_DIR, EVAL_KEYS, read_checkpoint, state_differences
from marginlab.errors import ConfigError, DataError

BACKBONE = "backbone."


def find_checkpoint(value, key: str = "checkpoint") -> Path:
    """A checkpoint file as given, or a run directory's ``checkpoints/best.pt`` (else ``last.pt``)."""
    path = Path(str(value)).expanduser()
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / CHECKPOINT_DIR / name).is_file():
                return path / CHECKPOINT_DIR / name
        raise ConfigError(f"{key}={value!r}: no {CHECKPOINT_DIR}/best.pt or last.pt in that run directory")
    if not path.is_file():
        raise ConfigError(f"{key}={value!r} is not allowed: give a checkpoint .pt file or a run directory")
    return path


def strip_prefix(state: dict, prefix: str) -> dict:
    """The entries of ``state`` under ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_backbone(path: Path, ckpt: dict) -> nn.Module:
    """The backbone a marginlab checkpoint's own config builds, holding its weights, on the CPU in eval mode."""
    data = ckpt["data"]
    backbone = instantiate(OmegaConf.create(ckpt["config"]["backbone"]), in_channels=data["in_channels"],
                           image_size=data["image_size"])
    state = strip_prefix(ckpt["model"], BACKBONE)
    differences = state_differences({k: list(v.shape) for k, v in backbone.state_dict().items()}, state)
    if differences:
        raise ConfigError(f"{path}: its weights do not fit the backbone its config builds "
                          f"({ckpt['config']['backbone'].get('_target_')}):\n  " + "\n  ".join(differences))
    backbone.load_state_dict(state)
    return backbone.eval()


def load_backbone(value, key: str = "checkpoint") -> tuple[nn.Module, dict, Path]:
    """(backbone in eval mode on the CPU, the checkpoint, its path) from a checkpoint file or a run directory."""
    path = find_checkpoint(value, key)
    ckpt = read_checkpoint(path, EVAL_KEYS)
    return build_backbone(path, ckpt), ckpt, path


# ---------------------------------------------------------------- init_from
def _module_groups(keys) -> list[str]:
    """The prefixes loaded all-or-nothing: ``head.`` and each ``regularizers.<name>.`` (the backbone is apart)."""
    groups = []
    for k in keys:
        if k.startswith(BACKBONE):
            continue
        parts = k.split(".")
        prefix = ".".join(parts[:2 if parts[0] == "regularizers" else 1]) + "."
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
        raise DataError(f"{path}: none of its {len(saved)} tensors fits this model's backbone "
                        f"({type(model.backbone).__name__}): not a checkpoint of this architecture")
    differences = state_differences(want, {k: v for k, v in saved.items() if k.startswith(BACKBONE)})
    if differences:
        raise ConfigError(f"init_from={value!r}: the backbone in {path} does not fit this model's "
                          f"({type(model.backbone).__name__}; {len(differences)} differences): {differences[0]}")
    model.backbone.load_state_dict(strip_prefix(saved, BACKBONE))
    loaded, skipped = [f"backbone ({len(want)} tensors)"], []
    for prefix in _module_groups(expected):
        keys = [k for k in expected if k.startswith(prefix)]
        group_fits = all(k in fits for k in keys)
        if head and not group_fits:
            bad = next(k for k in keys if k not in fits)
            raise ConfigError(f"init_from_head=true: {prefix.rstrip('.')} of {path} does not fit this model: "
                              f"{_describe(bad, saved, expected)}; set init_from_head=false to start it afresh")
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
