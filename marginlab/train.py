"""``marginlab train``: compose the config, validate it, build, loop over epochs, log, checkpoint."""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab import builders
from marginlab.checkpoint import CHECKPOINT_DIR, rng_state, save_atomic, set_rng_state
from marginlab.config.validate import apply_shorthands, validate
from marginlab.engine import LoopState, Precision, evaluate, resolve_device, resolve_precision, train_one_epoch
from marginlab.errors import ConfigError, MarginlabError
from marginlab.logging import RunLog
from marginlab.logging.run_log import write_json

BEST_METRIC = "test/acc"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def save_checkpoint(path: Path, model, optimizer, scheduler, prec: Precision, state: LoopState, cfg: DictConfig) -> None:
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "scaler": prec.scaler.state_dict(), "state": vars(state).copy(), "rng": rng_state(),
                 "config": OmegaConf.to_container(cfg, resolve=True)}, path)


def load_checkpoint(path: Path, model, optimizer, scheduler, prec: Precision) -> LoopState:
    ckpt = torch.load(path, map_location=prec.device, weights_only=False)
    saved_head = ckpt["config"]["head"]["_target_"]
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ConfigError(f"resume: {path} does not fit this model (it was trained with {saved_head}): "
                          f"{str(exc).splitlines()[0]}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    prec.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return LoopState(**ckpt["state"])


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One run from a composed config into ``run_dir``; returns the summary written to metrics.json."""
    start = time.perf_counter()
    apply_shorthands(cfg)
    validate(cfg)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)  # the values actually used
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    device = resolve_device(str(cfg.trainer.device))
    prec = Precision(device, resolve_precision(str(cfg.trainer.precision), device))
    channels_last = bool(cfg.trainer.channels_last) and device.type == "cuda"

    data = builders.build_data(cfg)
    data.setup()
    model = builders.build_model(cfg, data.in_channels, data.image_size, data.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if cfg.trainer.compile else model
    train_loader, val_loader = data.train_loader(), data.val_loader()
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg, optimizer, len(train_loader))
    state = LoopState()
    if cfg.resume:
        state = load_checkpoint(Path(cfg.resume), model, optimizer, scheduler, prec)

    log = RunLog(run_dir, tensorboard=cfg.logger.tensorboard)
    progress = sys.stdout.isatty() if cfg.logger.progress is None else bool(cfg.logger.progress)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    epochs = cfg.trainer.epochs
    last_epoch = min(epochs, cfg.trainer.get("stop_after_epoch") or epochs)
    record: dict = {}
    try:
        for epoch in range(state.epoch, last_epoch):
            data.set_epoch(epoch)
            train_stats = train_one_epoch(
                model, train_loader, optimizer, scheduler, prec, state, grad_clip=cfg.trainer.grad_clip,
                max_nonfinite=cfg.trainer.max_nonfinite_steps, channels_last=channels_last,
                log_every=cfg.logger.log_every_n_steps, log=log, progress=progress,
                desc=f"epoch {epoch + 1}/{epochs}", forward=forward)
            record = {"epoch": epoch + 1, "step": state.step, **{f"train/{k}": v for k, v in train_stats.items()}}
            if (epoch + 1) % cfg.trainer.eval_every_n_epochs == 0 or epoch + 1 == epochs:
                test_stats = evaluate(model, val_loader, prec, channels_last=channels_last,
                                      probe_max_samples=cfg.logger.probe_max_samples, forward=forward)
                record.update({f"test/{k}": v for k, v in test_stats.items()})
            record.update({f"head/{k}": v for k, v in model.head.schedule_values().items()})
            state.epoch = epoch + 1
            log.scalars({k: v for k, v in record.items() if k not in ("epoch", "step")}, state.step)
            log.epoch_record(record)
            is_best = record.get(BEST_METRIC, -math.inf) > state.best_metric
            if is_best:
                state.best_metric = record[BEST_METRIC]
            if cfg.trainer.checkpoint:
                save_checkpoint(ckpt_dir / "last.pt", model, optimizer, scheduler, prec, state, cfg)
                if is_best:
                    save_checkpoint(ckpt_dir / "best.pt", model, optimizer, scheduler, prec, state, cfg)
    finally:
        log.close()
    summary = {"status": "completed" if state.epoch >= epochs else "stopped", "run_dir": str(run_dir),
               "epochs_done": state.epoch, "steps": state.step, "best/" + BEST_METRIC: state.best_metric,
               "nonfinite_steps": state.nonfinite_total, "device": str(device), "precision": prec.name,
               "wall_time_s": time.perf_counter() - start, **record}
    log.final(summary)
    shown = ", ".join(f"{k} {summary[k]:.4f}" for k in ("test/acc", "test/loss") if k in summary)
    print(f"marginlab: {summary['status']} {state.epoch}/{epochs} epochs in {summary['wall_time_s']:.1f} s; "
          f"{shown}; {run_dir}")
    return summary


def run(cfg: DictConfig) -> float:
    """The Hydra task: user errors become one clear line (and a failed metrics.json), never a traceback."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = train(cfg, run_dir)
    except MarginlabError as err:
        print(f"marginlab: error: {err}", file=sys.stderr)
        write_json(run_dir / "metrics.json", {"status": "failed", "error": str(err), "error_type": type(err).__name__})
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return float("nan")
        raise SystemExit(2) from None
    return summary.get(BEST_METRIC, float("nan"))


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    return run(cfg)
