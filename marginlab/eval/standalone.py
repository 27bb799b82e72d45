"""``marginlab eval checkpoint=<path or run dir> verification=[lfw,cfp_fp,agedb_30]``: score a saved model.

Rebuilds the backbone from the checkpoint's own config, runs each verification set with the InsightFace
protocol and writes ``<checkpoint>.eval.json`` next to the checkpoint (plus ROC figures beside it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf

import marginlab.config  # noqa: F401  (resolvers)
from marginlab.command_args import run_command
from marginlab.checkpoint import EVAL_KEYS, read_checkpoint
from marginlab.engine import resolve_device
from marginlab.data.face import parse_image_size
from marginlab.errors import ConfigError
from marginlab.builders import build_verifiers
from marginlab.eval.during_training import jsonable, run_verifiers
from marginlab.logging.run_log import write_json
from marginlab.weights import build_backbone, find_checkpoint


#: what every verification set gives the backbone: RGB face crops, fitted to the checkpoint's image_size
VERIFICATION_CHANNELS = 3


def check_fits_verification(path: Path, data: dict, sets: list[str] = ()) -> None:
    """A ConfigError, before anything is computed, when the checkpoint's input cannot take verification images."""
    channels, size = data.get("in_channels"), data.get("image_size")
    try:
        parse_image_size(size, "image_size")
        fits = channels == VERIFICATION_CHANNELS
    except ConfigError:
        fits = False
    if not fits:
        named = f" ({', '.join(sets)})" if sets else ""
        raise ConfigError(f"{path} does not fit the verification images: its model takes in_channels={channels}, "
                          f"image_size={size!r}; the verification sets{named} give {VERIFICATION_CHANNELS}-channel "
                          "(RGB) face crops, fitted to an image_size of one integer or [height, width]: evaluate a "
                          "model trained on a face data set (e.g. dataset=casia)")


def load_backbone(path: Path, device: torch.device, sets: list[str] = ()):
    """The checkpoint's backbone in eval mode, its ``data`` entry and the checkpoint; checked against ``sets``."""
    ckpt = read_checkpoint(path, EVAL_KEYS)
    check_fits_verification(path, ckpt["data"], sets)
    return build_backbone(path, ckpt).to(device), ckpt["data"], ckpt


def evaluate_checkpoint(overrides: list[str]) -> dict:
    try:
        with initialize_config_module("marginlab.configs", version_base="1.3"):
            cfg = compose("eval", overrides=overrides)
    except HydraException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is missing: marginlab eval checkpoint=<checkpoint .pt or run dir>")
    path = find_checkpoint(cfg.checkpoint)
    device = resolve_device(str(cfg.device))
    verifiers = build_verifiers(cfg.get("verification"))  # lazy: nothing is read yet
    if not verifiers:
        raise ConfigError("no verification set selected: verification=[lfw,cfp_fp,agedb_30]")
    backbone, data, ckpt = load_backbone(path, device, sets=list(verifiers))
    if cfg.flip is not None:
        for target in verifiers.values():
            target.flip = bool(cfg.flip)
    scalars, results = run_verifiers(verifiers, backbone, data["image_size"], device, figures_dir=path.parent,
                                     epoch=ckpt.get("state", {}).get("epoch"))
    out = {"checkpoint": str(path), "epoch": ckpt.get("state", {}).get("epoch"), **scalars,
           "results": {name: jsonable(r) for name, r in results.items()}}
    target = path.with_suffix(".eval.json")
    write_json(target, out)  # strict JSON: NaN/inf as null, named under "nonfinite"
    for name in results:
        print(f"{name}: acc {scalars[f'{name}/acc']:.4f} +- {scalars[f'{name}/acc_std']:.4f}, "
              f"TAR@FAR=1e-3 {scalars[f'{name}/tar_at_far']:.4f}, AUC {scalars[f'{name}/auc']:.4f}, "
              f"EER {scalars[f'{name}/eer']:.4f}")
    print(f"marginlab: wrote {target}")
    return out


def main(args: list[str]) -> int:
    return run_command(__doc__, evaluate_checkpoint, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
