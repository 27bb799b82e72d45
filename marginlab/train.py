"""``marginlab train``: compose the config, validate it, build, loop over epochs, log, checkpoint."""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab import builders, sweep
from marginlab.builders import MarginModel
from marginlab.checkpoint import (CHECKPOINT_DIR, RESUME_KEYS, finite_weights_note, prepare_resumed_run,
                                  read_checkpoint, rng_state, save_atomic, set_rng_state, state_differences)
from marginlab.collapse import CollapseWatch
from marginlab.config.validate import apply_shorthands, validate
from marginlab.distributed import sharded_state
from marginlab.distributed.partial_fc import PartialFC
from marginlab.distributed.runtime import DistContext
from marginlab.engine import (LoopState, Precision, check_finite_state, evaluate, resolve_device, resolve_precision,
                              train_one_epoch)
from marginlab.errors import ConfigError, TrainingError
from marginlab.eval.during_training import run_verifiers
from marginlab.logging import RunLog
from marginlab.margin_feasibility import check_margin
from marginlab.probe import GeometryProbe
from marginlab.resume import read_history, record_resume
from marginlab.weights import init_from

BEST_METRIC = "val/acc"  # what best.pt and the sweep objective are chosen on, when there is a validation split


def selection_metric(best_on: str, verifiers: dict, has_val: bool, has_test: bool) -> str:
    """The record key best.pt is chosen on (``trainer.best_on``); ``epoch``: the last epoch.

    auto: the first verification set's accuracy (face data: the verification pairs are not training images),
    else ``val/acc``, else the last epoch. ``test`` selects on the reported split: optimistic, labelled so.
    """
    if best_on in ("val", "test") and not (has_val if best_on == "val" else has_test):
        fix = "set dataset.val_fraction > 0" if best_on == "val" else "this data set has no test split"
        raise ConfigError(f"trainer.best_on={best_on} is not allowed: there is no {best_on} split ({fix})")
    if best_on == "auto":
        return f"{next(iter(verifiers))}/acc" if verifiers else BEST_METRIC if has_val else "epoch"
    return {"val": BEST_METRIC, "test": "test/acc", "last": "epoch"}[best_on]


def selected_metrics(record: dict) -> dict:
    """What the summary reports of the selected epoch: its number and its evaluation sets' accuracy and loss."""
    return {k: v for k, v in record.items()
            if k == "epoch" or (k.endswith(("/acc", "/loss")) and not k.startswith(("train/", "head/")))}


def objective(summary: dict) -> float:
    """What a sweeper maximises: the selection metric at the selected epoch; NaN when selecting the last epoch."""
    key = summary.get("best_metric")
    if not key or key == "epoch":
        return float("nan")
    return summary.get(f"best/{key}", summary.get(key, float("nan")))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def checkpoint_payload(model_state: dict, optimizer_state: dict, model, scheduler, prec: Precision,
                       state: LoopState, cfg: DictConfig, data) -> dict:
    """What ``last.pt``/``best.pt`` hold; model and optimizer state in the unsharded layout (sharded_state.py)."""
    payload = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
               "scaler": prec.scaler.state_dict(), "state": vars(state).copy(), "rng": rng_state(),
               "config": OmegaConf.to_container(cfg, resolve=True),
               "data": {"in_channels": data.in_channels, "image_size": data.image_size,
                        "num_classes": data.num_classes}}  # what `marginlab eval` needs to rebuild
    if isinstance(model.head, PartialFC):
        payload["partial_fc"] = {"step": model.head.step}  # its negatives are drawn per (seed, rank, step)
    return payload


def load_checkpoint(path: Path, model, optimizer, scheduler, prec: Precision) -> LoopState:
    ckpt = read_checkpoint(path, RESUME_KEYS, map_location=prec.device)
    saved_head = ckpt["config"]["head"]["_target_"]
    differences = state_differences(sharded_state.unsharded_shapes(model), ckpt["model"])
    if differences:
        raise ConfigError(f"resume: {path} does not fit this model (it was trained with {saved_head}):\n  "
                          + "\n  ".join(differences))
    sharded_state.load_model_state_dict(model, ckpt["model"])
    sharded_state.load_optimizer_state_dict(optimizer, model, ckpt["optimizer"])
    # the schedule is the config's (a longer run is checked in resume.py), not the saved callable's attributes
    scheduler.load_state_dict({**ckpt["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    prec.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    state = LoopState(**ckpt["state"])
    if isinstance(model.head, PartialFC):
        model.head.step = ckpt.get("partial_fc", {}).get("step", state.step)
    return state


def training_views(cfg: DictConfig, model: MarginModel, dist: DistContext, device: torch.device, num_classes: int,
                   classifies: bool):
    """(forward for training, model for evaluation, forward for evaluation).

    Plain heads: the whole model is compiled and/or wrapped in DDP. A Partial FC head synchronises itself and
    holds a different shard on every rank, so only the backbone is; when there is a validation set
    (``classifies``) rank 0 evaluates with an unsharded copy of the head, its weights gathered each evaluated
    epoch (``sync_eval_head``). Face data sets have none: verification needs the backbone alone.
    """
    ddp_args = {"device_ids": [device.index] if device.type == "cuda" else None}
    if not isinstance(model.head, PartialFC):
        forward = torch.compile(model) if cfg.trainer.compile else model
        if dist.enabled:  # gradients averaged across ranks; evaluation runs on rank 0 without DDP's collectives
            return DistributedDataParallel(forward, **ddp_args), model, model
        return forward, model, forward
    body = torch.compile(model.backbone) if cfg.trainer.compile else model.backbone
    forward = MarginModel(DistributedDataParallel(body, **ddp_args) if dist.enabled else body, model.head,
                          model.regularizers)
    eval_head = model.head.head  # one rank: its shard is every class
    if dist.enabled:
        eval_head = None
        if classifies and dist.is_main:
            with torch.random.fork_rng(devices=[]):  # the copy's random init must not shift rank 0's random stream
                eval_head = builders.build_head(cfg, model.head.head.in_features, num_classes, shard=False).to(device)
    eval_model = MarginModel(model.backbone, eval_head, model.regularizers)
    return forward, eval_model, eval_model


def sync_eval_head(eval_model: MarginModel, model_state: dict) -> None:
    """Rank 0's unsharded evaluation head takes the gathered weights of the Partial FC shards."""
    eval_model.head.load_state_dict({k[len("head."):]: v for k, v in model_state.items() if k.startswith("head.")})


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One run from a composed config into ``run_dir``; returns the summary written to metrics.json."""
    start = time.perf_counter()
    apply_shorthands(cfg)
    validate(cfg)
    device = resolve_device(str(cfg.trainer.device))
    dist = DistContext.from_env(device.type)  # torchrun: one process per device; plain runs: rank 0 of 1
    device = dist.device(device)
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # every rank uses rank 0's directory; only rank 0 writes
    if dist.is_main and not cfg.resume:  # a resume rewrites it only once it starts training (below)
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)  # the values actually used
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    prec = Precision(device, resolve_precision(str(cfg.trainer.precision), device))
    channels_last = bool(cfg.trainer.channels_last) and device.type == "cuda"

    verifiers = builders.build_verifiers(cfg.get("verification"))  # lazy: sets are read at the first evaluation
    data = builders.build_data(cfg)
    data.distribute(dist.rank, dist.world_size)
    data.setup()
    model = builders.build_model(cfg, data.in_channels, data.image_size, data.num_classes).to(device)
    # before any work: can C classes in embedding_dim dimensions satisfy the margin? (margin_feasibility.py)
    margin = check_margin(model.head.head if isinstance(model.head, PartialFC) else model.head,
                          bool(cfg.trainer.get("strict_margin", False)))
    run_warnings = [f"margin {margin.verdict}: {margin.message}"] if margin and margin.verdict != "ok" else []
    watch = CollapseWatch(data.num_classes, margin.code.deg if margin else None)
    if cfg.get("init_from") and not cfg.resume:  # a new run from a checkpoint's weights; a resume has its own
        message = init_from(model, cfg.init_from, cfg.get("init_from_head"))
        if dist.is_main:
            print(message)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, test_loader = data.loaders(device)
    best_key = selection_metric(str(cfg.trainer.best_on), verifiers, val_loader is not None,
                                test_loader is not None)
    if best_key == "test/acc" and dist.is_main:
        print("marginlab: warning: trainer.best_on=test: best.pt and best/* are chosen on the test split, so "
              "best/test/acc is optimistic; use a validation split (dataset.val_fraction > 0) for a table")
    elif best_key == "epoch" and val_loader is None and dist.is_main:
        print("marginlab: no validation split: best.pt is the last epoch and a sweep has no objective "
              "(set dataset.val_fraction > 0, or trainer.best_on=test to select on test, labelled optimistic)")
    evaluated = [(split, loader) for split, loader in (("val", val_loader), ("test", test_loader))
                 if loader is not None]
    probe_split = evaluated[-1][0] if evaluated else None  # the geometry probe looks at test, else val
    sharded = isinstance(model.head, PartialFC) and dist.enabled  # the head's weights differ per rank
    if sharded and prec.name == "fp16":  # GradScaler would decide to skip a step per rank, from its own shard
        raise ConfigError("trainer.precision='fp16' is not allowed with head.partial_fc on several processes: "
                          "use trainer.precision=bf16 (no loss scaling) or 32")
    forward, eval_model, eval_forward = training_views(cfg, model, dist, device, data.num_classes,
                                                       classifies=bool(evaluated))
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg, optimizer, len(train_loader))
    state = LoopState()
    if cfg.resume:
        state = load_checkpoint(Path(cfg.resume), model, optimizer, scheduler, prec)
    if cfg.resume and dist.is_main:  # every check has passed (marginlab/resume.py): the resume starts training
        given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        record_resume(run_dir, [o for o in given if not o.startswith("resume=")], state.epoch)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
        prepare_resumed_run(run_dir, state.epoch)  # no temp file of a killed save, no epoch record ahead of it

    log = RunLog(run_dir, tensorboard=cfg.logger.tensorboard, enabled=dist.is_main, console=cfg.logger.console)
    log.start(cfg, dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None)  # config, hparams
    probe = GeometryProbe.from_config(cfg, run_dir, log)  # histograms, geometry/*.npz, figures/*.png
    progress = dist.is_main and (sys.stdout.isatty() if cfg.logger.progress is None else bool(cfg.logger.progress))
    ckpt_dir = run_dir / CHECKPOINT_DIR
    saved = (Path(cfg.resume), state.epoch) if cfg.resume else None  # where the last finite weights are
    epochs = cfg.trainer.epochs
    last_epoch = min(epochs, cfg.trainer.get("stop_after_epoch") or epochs)
    record: dict = {}
    try:
        for epoch in range(state.epoch, last_epoch):
            epoch_start = time.perf_counter()
            data.set_epoch(epoch)
            try:
                train_stats = train_one_epoch(
                    model, train_loader, optimizer, scheduler, prec, state, grad_clip=cfg.trainer.grad_clip,
                    max_nonfinite=cfg.trainer.max_nonfinite_steps, channels_last=channels_last,
                    log_every=cfg.logger.log_every_n_steps, log=log, progress=progress,
                    desc=f"epoch {epoch + 1}/{epochs}", forward=forward, dist=dist)
                check_finite_state(model, epoch + 1, dist)  # non-finite weights are never evaluated or saved
            except TrainingError as err:
                raise TrainingError(f"{err}; {finite_weights_note(saved)}") from None
            record = {"epoch": epoch + 1, "step": state.step, **{f"train/{k}": v for k, v in train_stats.items()}}
            evaluating = (epoch + 1) % cfg.trainer.eval_every_n_epochs == 0 or epoch + 1 == epochs
            model_state = optimizer_state = None
            syncing = evaluating and sharded and bool(evaluated)
            if cfg.trainer.checkpoint or syncing:  # collectives when sharded: every rank calls
                model_state = sharded_state.model_state_dict(model)  # None off rank 0 when sharded
                if cfg.trainer.checkpoint:
                    optimizer_state = sharded_state.optimizer_state_dict(optimizer, model)
            if dist.is_main and evaluating:
                if syncing:
                    sync_eval_head(eval_model, model_state)
                for split, loader in evaluated:  # val: loss and accuracy; the probe's split: its geometry too
                    probed = split == probe_split
                    stats = evaluate(eval_model, loader, prec, channels_last=channels_last,
                                     probe_max_samples=cfg.logger.probe_max_samples if probed else 0,
                                     forward=eval_forward, probe=probe if probed else None)
                    if probed:
                        stats.update(probe.end_epoch(epoch + 1, state.step, eval_model.head))
                    else:
                        stats = {"loss": stats["loss"], "acc": stats["acc"]}
                    record.update({f"{split}/{k}": v for k, v in stats.items()})
                if verifiers:  # lfw/acc, lfw/auc, ... and figures/roc_<name>.png
                    record.update(run_verifiers(verifiers, model.backbone, data.image_size, device,
                                                figures_dir=run_dir / "figures" if cfg.logger.figures else None,
                                                writer=log.writer, step=state.step, epoch=epoch + 1)[0])
            record.update({f"head/{k}": v for k, v in model.head.schedule_values().items()})
            state.epoch = epoch + 1
            record["time/epoch_s"] = time.perf_counter() - epoch_start  # training + evaluation
            log.scalars({k: v for k, v in record.items() if k not in ("epoch", "step")}, state.step)
            warnings = watch.check(record)  # collapse: class weights, chance accuracy, feature norms (collapse.py)
            if warnings:
                record["warnings"] = warnings
            log.epoch_record(record)
            log.epoch_line(record, epochs, warnings)  # console (terminal or not) and train.log
            is_best = record.get(best_key, -math.inf) > state.best_metric
            if is_best:
                state.best_metric, state.best_record = record[best_key], selected_metrics(record)
            if cfg.trainer.checkpoint and dist.is_main:  # best.pt first: a kill in between redoes this epoch
                payload = checkpoint_payload(model_state, optimizer_state, model, scheduler, prec, state, cfg, data)
                if is_best:
                    save_atomic(payload, ckpt_dir / "best.pt")
                save_atomic(payload, ckpt_dir / "last.pt")
            if cfg.trainer.checkpoint:
                saved = (ckpt_dir / "last.pt", state.epoch)
            dist.barrier()  # the other ranks wait while rank 0 evaluates and saves
        if dist.is_main:
            probe.end_run(state.step)  # final features, target-angle distribution, embedding projector
    except BaseException:
        log.close()
        raise
    finally:
        dist.shutdown()
    summary = {"status": "completed" if state.epoch >= epochs else "stopped", "run_dir": str(run_dir),
               "epochs_done": state.epoch, "steps": state.step, "best_metric": best_key,
               "best/" + best_key: state.best_metric, **{f"best/{k}": v for k, v in state.best_record.items()},
               "nonfinite_steps": state.nonfinite_total, "device": str(device), "precision": prec.name,
               "wall_time_s": time.perf_counter() - start, **record,
               "warnings": run_warnings + watch.first_warnings()}
    try:
        log.final(summary)  # metrics.json; TensorBoard's best/* and the HParams session end
    finally:
        log.close()
    if not dist.is_main:
        return summary
    keys = ("val/acc", "test/acc", "test/loss", f"best/{best_key}", "best/test/acc")
    shown = ", ".join(f"{k} {summary[k]:.4f}" for k in dict.fromkeys(keys) if k in summary and k != "best/epoch")
    chosen = "the last epoch" if best_key == "epoch" else f"best {best_key}"
    shown += f"; best.pt: epoch {summary['best/epoch']} ({chosen})" if "best/epoch" in summary else ""
    print(f"marginlab: {summary['status']} {state.epoch}/{epochs} epochs in {summary['wall_time_s']:.1f} s; "
          f"{shown}; {run_dir}")
    return summary


def run(cfg: DictConfig) -> float:
    """The Hydra task: every failure is recorded in a failed metrics.json. User errors, out of memory and files
    the system refuses to write become one clear line (exit 2), a bug its traceback too (exit 1). In a multirun
    the sweep goes on (marginlab/sweep.py)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    resumes = len(read_history(run_dir)) if cfg.resume else None
    try:
        summary = train(cfg, run_dir)
    except Exception as err:  # a resume is recorded once it starts training; until then the run stays as it was
        message = sweep.record_failure(run_dir, err, write=resumes is None or len(read_history(run_dir)) > resumes)
        code = 2 if sweep.is_user_error(err) else 1
    else:
        return objective(summary)
    sweep.free_memory()  # the failed run's tensors are unreachable once the exception is gone
    if multirun:
        return sweep.failed_job_result(message)
    raise SystemExit(code)
