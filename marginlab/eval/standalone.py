"""``marginlab eval checkpoint=<path or run dir> verification=[lfw,cfp_fp,agedb_30]``: score a saved model.

``retrieval=true`` scores a metric-learning run instead: its own data set's retrieval sets of unseen classes
(``test``, ``val`` with ``dataset.val_fold``; In-Shop's query against its gallery), rebuilt from the config saved in
the checkpoint (``retrieval_root=`` where the images now are), on the trunk's embedding (eval/retrieval_sets.py):
P@1, R-precision, MAP@R, Recall@k. Verification sets then run only when named (``verification=[...]``).
``ensemble=[<run dir>, ...]`` adds the protocol's "concatenated" score (``test_concat/...``): the other folds' models
(same data set, another ``dataset.val_fold``) embed the test images too, each embedding L2-normalised, side by side.

Rebuilds the backbone from the checkpoint's own config (a bare state dict -- InsightFace arcface_torch's
``backbone.pth``, ``marginlab export format=state_dict`` -- with ``backbone=<name>``, e.g. ``backbone=iresnet50``,
and ``image_size=`` its input, default 112) and runs each verification set with the InsightFace protocol.

Nothing is overwritten: each set's result goes to its own file, ``<checkpoint stem>.eval/<set>-<UTC time>.json``
(with the options it ran with) and its ROC figure beside it (``.png``); ``<checkpoint stem>.eval.json`` is the
merged record, rebuilt from every file in that folder: the latest result of each set (``<set>/acc``, ...,
``results``) and every evaluation under ``evaluations`` (set, time, file). Strict JSON: NaN never appears (null,
with the reason under ``undefined`` / ``nonfinite``).
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf

import marginlab.config  # noqa: F401  (resolvers)
from marginlab.data.face import parse_image_size
from marginlab.device import resolve_device
from marginlab.errors import ConfigError, OutputError
from marginlab.eval.during_training import draw_roc, jsonable, run_verifiers
from marginlab.eval.retrieval_sets import check_retrievable, retrieval_line, run_retrieval
from marginlab.files import NONFINITE_KEY, check_writable, dumps, free_path, write_failed, write_json, write_text
from marginlab.training.builders import build_data, build_verifiers
from marginlab.training.checkpoint import find_checkpoint
from marginlab.training.weights import load_backbone as load_weights

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
        raise ConfigError(
            f"{path} does not fit the verification images: its model takes in_channels={channels}, "
            f"image_size={size!r}; the verification sets{named} give {VERIFICATION_CHANNELS}-channel "
            "(RGB) face crops, fitted to an image_size of one integer or [height, width]: evaluate a "
            "model trained on a face data set (e.g. dataset=casia)"
        )


def load_backbone(path: Path, device: torch.device, sets: list[str] = (), backbone=None, image_size=None):
    """The checkpoint's backbone in eval mode, its ``data`` entry and the checkpoint; checked against ``sets``.
    ``backbone`` / ``image_size``: the architecture and input of a bare state dict (``weights.load_backbone``)."""
    module, ckpt, _ = load_weights(path, backbone=backbone, image_size=image_size)
    check_fits_verification(path, ckpt["data"], sets)
    return module.to(device), ckpt["data"], ckpt


# ---- results that never overwrite earlier ones ------------------------------------------------------------------
def eval_dir(path: Path) -> Path:
    """Where each evaluation of checkpoint ``path`` goes: ``<stem>.eval/`` beside it."""
    return path.with_name(f"{path.stem}.eval")


def options(target) -> dict:
    """A set's settings as plain JSON values (its dataclass fields, private ones left out)."""
    if not dataclasses.is_dataclass(target):
        return {}
    plain = (str, int, float, bool, type(None))
    return {
        f.name: getattr(target, f.name)
        for f in dataclasses.fields(target)
        if not f.name.startswith("_") and isinstance(getattr(target, f.name), (*plain, list, tuple))
    }


def write_record(path: Path, name: str, record: dict, stamp: str) -> Path:
    """``<stem>.eval/<name>-<stamp>.json``, never over an existing file (a taken name gets ``-1``, ``-2``, ...)."""
    target = free_path(eval_dir(path) / f"{name}-{stamp}.json", ".json", companions=())
    write_text(target, dumps(record, indent=2, sort_keys=True) + "\n")  # strict JSON (files.py)
    return target


def is_eval_record(record) -> bool:
    """One evaluation as ``write_record`` writes it: read back from a folder anyone may write, so each field used
    is checked (a hand-made file with a list for ``scalars`` or a number for ``time`` is skipped, not merged)."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("set"), str)
        and isinstance(record.get("time"), str)
        and isinstance(record.get("scalars", {}), dict)
        and isinstance(record.get(NONFINITE_KEY) or {}, dict)
    )


def merged_record(path: Path) -> dict:
    """The record of every evaluation of ``path``: the latest per set at the top, all of them under
    ``evaluations``, rebuilt from the files in ``<stem>.eval/`` (so a lost update loses nothing)."""
    records = []
    for file in sorted(eval_dir(path).glob("*.json")):
        try:
            record = json.loads(file.read_text())
        except (OSError, ValueError):
            continue  # a file being written by another evaluation, or not ours
        if is_eval_record(record):
            records.append((record["time"], file.name, record))
    records.sort(key=lambda r: (r[0], r[1]))
    latest = {record["set"]: (file, record) for _, file, record in records}
    out = {
        "checkpoint": str(path),
        "results": {},
        "files": {},
        "evaluations": [
            {"set": r["set"], "time": r["time"], "file": f"{eval_dir(path).name}/{file}"} for _, file, r in records
        ],
    }
    nonfinite = {}
    for name, (file, record) in latest.items():
        out.update(record.get("scalars", {}))
        out["results"][name] = record.get("result")
        out["files"][name] = f"{eval_dir(path).name}/{file}"
        out["epoch"] = record.get("epoch")
        for key, what in (record.get(NONFINITE_KEY) or {}).items():  # where the record has null for NaN/inf
            key = key.removeprefix("scalars.")
            nonfinite[f"results.{name}.{key.removeprefix('result.')}" if key.startswith("result.") else key] = what
    if nonfinite:
        out[NONFINITE_KEY] = nonfinite
    return out


def evaluate_checkpoint(overrides: list[str]) -> dict:
    try:
        with initialize_config_module("marginlab.configs", version_base="1.3"):
            cfg = compose("eval", overrides=overrides)
    except HydraException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ConfigError("checkpoint is missing: marginlab eval checkpoint=<checkpoint .pt or run dir>")
    # first: a bad setting (nfolds, far_target, ...) fails before the checkpoint is read; lazy, only a given
    # nfolds reads its set's labels (to bound it by the pairs of either kind)
    retrieval = bool(cfg.get("retrieval"))
    named = any(o.lstrip("+~").startswith("verification") for o in overrides)  # the default [lfw] is a face run's
    verifiers = build_verifiers(cfg.get("verification")) if named or not retrieval else {}
    if not verifiers and not retrieval:
        raise ConfigError(
            "no verification set selected: verification=[lfw,cfp_fp,agedb_30] (retrieval=true: a metric-learning run)"
        )
    path = find_checkpoint(cfg.checkpoint)
    for folder in (path.parent, eval_dir(path)):  # before the work: a result that cannot be kept is not computed
        check_writable(folder, "; marginlab eval writes beside the checkpoint: copy it to a writable folder")
    device = resolve_device(str(cfg.device))
    size = cfg.get("image_size")  # a bare state dict's input (None: its own, 112)
    size = OmegaConf.to_container(size) if OmegaConf.is_config(size) else size
    if verifiers:
        backbone, data, ckpt = load_backbone(
            path, device, sets=list(verifiers), backbone=cfg.get("backbone"), image_size=size
        )
    else:  # retrieval alone: any input the run's own data set gives
        module, ckpt, _ = load_weights(path, backbone=cfg.get("backbone"), image_size=size)
        backbone, data = module.to(device), ckpt["data"]
    retrieval_sets = retrieval_data(path, ckpt, cfg.get("retrieval_root")) if retrieval else None
    others = list(cfg.get("ensemble") or [])
    if others and not retrieval:
        raise ConfigError("ensemble=[...] is not allowed without retrieval=true: it joins retrieval embeddings")
    members = [ensemble_member(other, ckpt, device) for other in others]
    if cfg.flip is not None:
        for target in verifiers.values():
            target.flip = bool(cfg.flip)
    for target in verifiers.values():
        if hasattr(target, "use_checkpoint"):  # IJB: image features cached beside the checkpoint
            target.use_checkpoint(path)
    epoch = ckpt.get("state", {}).get("epoch")
    scalars, results = run_verifiers(verifiers, backbone, data["image_size"], device, epoch=epoch)
    set_options = {name: options(target) for name, target in verifiers.items()}
    if retrieval_sets is not None:
        found, retrieved = run_retrieval(retrieval_sets.retrieval_loaders(), backbone, device)
        scalars.update(found)
        results.update(retrieved)
        where = {"dataset": type(retrieval_sets).__name__, "root": str(getattr(retrieval_sets, "root", ""))}
        set_options.update({name: {"embedding": "backbone", **where} for name in retrieved})
    if members:  # each fold holds out its own val classes: only the shared test sets are joined
        shared = {n: loader for n, loader in retrieval_sets.retrieval_loaders().items() if n != "val"}
        found, joined = run_retrieval(shared, [backbone, *(m for m, _ in members)], device, suffix="_concat")
        scalars.update(found)
        results.update(joined)
        checkpoints = [str(path), *(str(p) for _, p in members)]
        set_options.update(
            {name: {"embedding": "concatenated", "checkpoints": checkpoints, **where} for name in joined}
        )
    for name in results:  # printed first: a result is never lost to a file that cannot be written
        if name not in verifiers:
            print(retrieval_line(name, results[name]))
        elif "summary" in results[name]:  # IJB-B/C: TAR at each FAR, AUC and the protocol's flags
            print(results[name]["summary"])
        else:
            print(verification_line(name, results[name]))
    now = datetime.now(timezone.utc)
    records = {
        name: {
            "checkpoint": str(path),
            "set": name,
            "time": now.isoformat(),
            "epoch": epoch,
            "options": set_options[name],
            "weights": ckpt.get("weights"),
            "scalars": {k: v for k, v in scalars.items() if k.startswith(f"{name}/")},
            "result": jsonable(result),
        }
        for name, result in results.items()
    }
    written, target = [], path.with_suffix(".eval.json")
    try:
        for name, record in records.items():
            file = write_record(path, name, record, now.strftime("%Y%m%dT%H%M%SZ"))
            if name in verifiers:
                draw_roc(results[name], name, file.with_suffix(".png"), epoch=epoch)
            written.append(file)
        out = merged_record(path)
        try:
            write_json(target, out)  # strict JSON: NaN/inf as null, named under "nonfinite"
        except OSError as exc:
            raise write_failed(target, exc) from None
    except OutputError as exc:
        unsaved = list(records)[len(written) :]
        for name in unsaved:  # the whole record, as its file would hold it, one JSON line each
            print(dumps(records[name], sort_keys=True))
        shown = f"; the results of {', '.join(unsaved)} are printed above (stdout), one JSON line each"
        raise OutputError(f"{exc}{shown if unsaved else ''}") from None
    print(f"marginlab: wrote {', '.join(str(f) for f in written)} (ROC figures beside them) and {target}")
    return out


def retrieval_data(path: Path, ckpt: dict, root: str | None):
    """The checkpoint's own data module (its saved ``dataset`` config; ``root``: where its images are now), set up,
    with retrieval sets that can be scored; ConfigError when the run's data set has none."""
    node = (ckpt.get("config") or {}).get("dataset")
    if not isinstance(node, dict) or "_target_" not in node:
        raise ConfigError(
            f"{path} carries no dataset config (a bare state dict): retrieval=true needs a marginlab checkpoint"
        )
    node = {**node, **({"root": str(root)} if root is not None else {})}
    data = build_data(OmegaConf.create({"dataset": node}))
    data.setup()
    if not data.retrieval_sets:
        raise ConfigError(
            f"{path} was trained on {node['_target_']}, which has no retrieval set of unseen classes: "
            "retrieval=true is for dataset=cub200, cars196, sop, inshop or digits_retrieval runs"
        )
    check_retrievable(data.retrieval_sets)
    return data


def ensemble_member(value, first: dict, device):
    """(backbone, path) of another fold's checkpoint for ``ensemble=``; ConfigError unless it trained on the same
    data set (its dataset config equal to the first's but for ``val_fold``)."""
    module, ckpt, path = load_weights(value, key="ensemble")
    mine, theirs = ((c.get("config") or {}).get("dataset") or {} for c in (first, ckpt))
    if {k: v for k, v in mine.items() if k != "val_fold"} != {k: v for k, v in theirs.items() if k != "val_fold"}:
        raise ConfigError(
            f"ensemble: {path} trained on another data set ({theirs.get('_target_')}, root {theirs.get('root')}) "
            f"than the checkpoint ({mine.get('_target_')}, root {mine.get('root')}): join folds of one run's protocol"
        )
    return module.to(device), path


def verification_line(name: str, result: dict) -> str:
    """A 10-fold set's printed line: accuracy +- std, TAR at the set's own ``far_target``, AUC, EER."""
    return (
        f"{name}: acc {result['accuracy']:.4f} +- {result['accuracy_std']:.4f}, "
        f"TAR@FAR={result['far_target']:.0e} {result['tar_at_far']:.4f}, "  # the set's far_target, not always 1e-3
        f"AUC {result['auc']:.4f}, EER {result['eer']:.4f}"
    )
