"""``marginlab train``: compose the config, validate it, build, loop over epochs, log, checkpoint.

``train()`` is the recipe, each phase one function below: set up the run (config, device, ranks, precision, seeds),
build the job (data, model, loss, evaluation plan, optimizer), start or resume, then per epoch train, evaluate,
log, select and checkpoint, and finally summarise. The checkpoint format is checkpoint.py's, the loss losses/'s.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

import marginlab.config  # noqa: F401  (registers the schema and resolvers)
from marginlab import error_kinds
from marginlab.config.validate import HeadSpec, validate
from marginlab.device import training_device
from marginlab.distributed import sharded_state
from marginlab.distributed.runtime import DistContext
from marginlab.environment import environment, kept_threads, use_threads
from marginlab.errors import ConfigError, TrainingError
from marginlab.eval.during_training import run_verifiers
from marginlab.eval.retrieval_sets import METRICS, PRIMARY, check_retrievable, run_retrieval, tasks
from marginlab.files import write_json
from marginlab.geometry.probe import GeometryProbe
from marginlab.logging import RunLog
from marginlab.logging.run_log import close_trackers, start_trackers
from marginlab.losses import MarginLoss, criterion_for
from marginlab.run_dirs import RunLock
from marginlab.training import builders, sweep
from marginlab.training.builders import MarginModel
from marginlab.training.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_payload,
    finite_weights_note,
    load_training_state,
    prepare_resumed_run,
    save_checkpoints,
)
from marginlab.training.collapse import CollapseWatch
from marginlab.training.engine import (
    LoopOptions,
    LoopState,
    StepParts,
    check_finite_state,
    evaluate,
    train_one_epoch,
)
from marginlab.training.finished_line import finished_line
from marginlab.training.margin_feasibility import check_margin
from marginlab.training.precision import Precision
from marginlab.training.resume import read_history, recheck_resume, record_resume
from marginlab.training.weights import init_from

BEST_METRIC = "val/acc"  # what best.pt and the sweep objective are chosen on, when there is a validation split
#: the retrieval metrics a summary reports of the selected epoch, beside accuracy and loss
RETRIEVAL_SUFFIXES = tuple(f"/{key}" for key in METRICS)


def selection_metric(best_on: str, verifiers: dict, has_val: bool, has_test: bool, retrieved=()) -> str:
    """The record key best.pt is chosen on (``trainer.best_on``); ``epoch``: the last epoch.

    auto: the first verification set's accuracy (face data: the verification pairs are not training images),
    else ``val/acc``, else the ``val`` retrieval set's MAP@R (``dataset.val_fold``: the MLRC's selection, on
    held-out classes), else the last epoch. ``test`` selects on the reported split: optimistic, labelled so.
    ``retrieved``: the names of the retrieval results (eval/retrieval_sets.py), scored by ``<name>/map_at_r``.
    """
    closed = {"val": has_val, "test": has_test}  # a closed-set split is chosen on accuracy, a retrieval set on MAP@R
    key = {
        split: f"{split}/acc" if closed[split] else f"{split}/{PRIMARY}" if split in retrieved else None
        for split in closed
    }
    if best_on in ("val", "test") and key[best_on] is None:
        fix = "set dataset.val_fraction > 0" if best_on == "val" else "this data set has no test split"
        fix += " or dataset.val_fold=0 (held-out classes)" if retrieved and best_on == "val" else ""
        raise ConfigError(f"trainer.best_on={best_on} is not allowed: there is no {best_on} split ({fix})")
    if best_on == "auto":
        return f"{next(iter(verifiers))}/acc" if verifiers else key["val"] or "epoch"
    return {"val": key["val"], "test": key["test"], "last": "epoch"}[best_on]


def selected_metrics(record: dict) -> dict:
    """What the summary reports of the selected epoch: its number and its evaluation sets' accuracy and loss."""
    return {
        k: v
        for k, v in record.items()
        if k == "epoch"
        or (k.endswith(("/acc", "/loss", *RETRIEVAL_SUFFIXES)) and not k.startswith(("train/", "head/")))
    }


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


@dataclass
class Run:
    """Where and how this process runs: the run directory (rank 0's), device, ranks, arithmetic, console."""

    dir: Path
    device: torch.device
    dist: DistContext
    prec: Precision
    channels_last: bool
    progress: bool  # the tqdm bar within an epoch


@dataclass
class Job:
    """What the run trains and evaluates, built from the config."""

    data: object
    model: MarginModel
    criterion: MarginLoss  # the training loss (cross-entropy + regularizers + the head's term, or Partial FC's)
    train_loader: object
    evaluated: list  # [(split, loader)]: val and/or test
    probe_split: str | None  # the split the geometry probe looks at: test, else val
    best_key: str  # the record key best.pt is chosen on
    verifiers: dict
    retrieval: dict  # name -> loader of the data's retrieval sets (classes the head never trains on)
    forward: object  # the (compiled, DDP-wrapped) model the training steps call
    eval_model: MarginModel
    eval_forward: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    watch: CollapseWatch
    warnings: list[str]  # said before training (the margin advisor), repeated in the summary

    sharded: bool  # the head's weights differ per rank (Partial FC over several processes)

    @property
    def syncs_eval_head(self) -> bool:
        """Rank 0 evaluates a sharded head with an unsharded copy, which takes the gathered weights."""
        return self.sharded and bool(self.evaluated)


# ---------------------------------------------------------------- the recipe
class Interrupted(KeyboardInterrupt):
    """Ctrl-C once the run trains: ``summary`` is what its metrics.json records (``"status": "interrupted"``)."""

    def __init__(self, summary: dict):
        super().__init__()
        self.summary = summary


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One run from a composed config into ``run_dir``; returns the summary written to metrics.json."""
    start = time.perf_counter()
    head_spec = validate(cfg)  # the head resolved once (top-level m / s applied); the builder consumes it
    run = set_up_run(cfg, run_dir)  # device, ranks, precision, seeds; the config actually used
    job = build_job(cfg, run, head_spec)  # data, model, loss, evaluation plan, optimizer, schedule
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else None
    # MLflow / W&B first: a store that refuses stops a resume here, before any file of the run changes
    trackers = start_trackers(cfg, run.dir, choices) if run.dist.is_main else []
    state = log = None
    try:
        state = start_or_resume(cfg, run, job)  # LoopState(), or the checkpoint's weights, optimizer and generators
        log = RunLog(
            run.dir,
            tensorboard=cfg.logger.tensorboard,
            enabled=run.dist.is_main,
            console=cfg.logger.console,
            trackers=trackers,
        )
        log.start(cfg, choices)  # config, hparams
        probe = GeometryProbe.from_config(cfg, run.dir, log)  # histograms, geometry/*.npz, figures/*.png
        record = train_epochs(cfg, run, job, state, log, probe)
    except BaseException as err:
        if log is not None:  # the trackers end KILLED on Ctrl-C, else FAILED
            log.close()
        else:
            close_trackers(trackers)
        if isinstance(err, KeyboardInterrupt) and state is not None:
            summary = run_summary(cfg, run, job, state, {}, wall_time_s=time.perf_counter() - start)
            raise Interrupted({**summary, "status": "interrupted"}) from None
        raise
    finally:
        run.dist.shutdown()
    summary = run_summary(cfg, run, job, state, record, wall_time_s=time.perf_counter() - start)
    try:
        log.final(summary)  # metrics.json; TensorBoard's best/* and the HParams session end
    finally:
        log.close()
    if run.dist.is_main:
        print(finished_line(summary, cfg.trainer.epochs, job.best_key, run.dir))  # metrics it has, best.pt, the dir
    return summary


def train_epochs(cfg: DictConfig, run: Run, job: Job, state: LoopState, log: RunLog, probe) -> dict:
    """From ``state.epoch`` to the last epoch of this invocation; returns the last epoch's record."""
    epochs = cfg.trainer.epochs
    saved = (Path(cfg.resume), state.epoch) if cfg.resume else None  # where the last finite weights are
    record: dict = {}
    first = state.epoch  # this invocation's first record says where its numbers come from (environment.py)
    for epoch in range(state.epoch, min(epochs, cfg.trainer.get("stop_after_epoch") or epochs)):
        epoch_start = time.perf_counter()
        record = train_epoch(cfg, run, job, state, log, epoch, saved)
        evaluating = (epoch + 1) % cfg.trainer.eval_every_n_epochs == 0 or epoch + 1 == epochs
        model_state, optimizer_state = gather_state(cfg, job, syncing=evaluating and job.syncs_eval_head)
        if run.dist.is_main and evaluating:
            record.update(evaluate_epoch(cfg, run, job, state, log, probe, model_state, epoch))
        record.update({f"head/{k}": v for k, v in job.model.head.schedule_values().items()})
        state.epoch = epoch + 1
        record["time/epoch_s"] = time.perf_counter() - epoch_start  # training + evaluation
        log_epoch(record, job.watch, log, state.step, epochs, environment(run.device) if epoch == first else None)
        is_best = select_best(record, job.best_key, state)
        if cfg.trainer.checkpoint:
            saved = (save_epoch(cfg, run, job, state, model_state, optimizer_state, is_best), state.epoch)
        run.dist.barrier()  # the other ranks wait while rank 0 evaluates and saves
    if run.dist.is_main:
        probe.end_run(state.step)  # final features, target-angle distribution, embedding projector
    return record


# ---------------------------------------------------------------- setting up
def set_up_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Picks the device and this process's rank, saves the config actually used, seeds every generator."""
    cfg.trainer.num_threads = use_threads(cfg.trainer.get("num_threads"))  # float results depend on it: saved
    index = cfg.trainer.get("device_index")
    device = training_device(str(cfg.trainer.device), index)
    dist = DistContext.from_env(device.type)  # torchrun: one process per device; plain runs: rank 0 of 1
    if dist.enabled and index is not None:  # it would be ignored: each process takes the GPU of its LOCAL_RANK
        raise ConfigError(
            f"trainer.device_index={index} is not allowed under torchrun, which gives each process its own GPU "
            "(LOCAL_RANK); leave it null and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    device = dist.device(device)
    if device.index is not None:  # cuda:N is the current device too, for the work that names only "cuda"
        torch.cuda.set_device(device)
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # every rank uses rank 0's directory; only rank 0 writes
    if dist.is_main and not cfg.resume:  # a resume rewrites it only once it starts training (start_or_resume)
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)  # the values actually used
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    prec = Precision.from_setting(str(cfg.trainer.precision), device)
    progress = dist.is_main and (sys.stdout.isatty() if cfg.logger.progress is None else bool(cfg.logger.progress))
    return Run(run_dir, device, dist, prec, bool(cfg.trainer.channels_last) and device.type == "cuda", progress)


def build_job(cfg: DictConfig, run: Run, head_spec: HeadSpec) -> Job:
    """Everything the epochs need, in the order that fixes the random stream (model init before the loaders)."""
    verifiers = builders.build_verifiers(cfg.get("verification"))  # lazy: sets are read at the first evaluation
    data = builders.build_data(cfg)
    data.distribute(run.dist.rank, run.dist.world_size)
    data.setup()
    model = builders.build_model(cfg, data.in_channels, data.image_size, data.num_classes, head=head_spec)
    model = model.to(run.device)
    criterion = criterion_for(model)  # the same head and regularizer modules, as the loss
    # before any work: can C classes in embedding_dim dimensions satisfy the margin? (margin_feasibility.py)
    margin = check_margin(criterion.margin_head, bool(cfg.trainer.get("strict_margin", False)))
    warnings = [f"margin {margin.verdict}: {margin.message}"] if margin and margin.verdict != "ok" else []
    watch = CollapseWatch(data.num_classes, margin.code.deg if margin else None)
    if cfg.get("init_from") and not cfg.resume:  # a new run from a checkpoint's weights; a resume has its own
        message = init_from(model, cfg.init_from, cfg.get("init_from_head"))
        if run.dist.is_main:
            print(message)
    if run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_loader, val_loader, test_loader = data.loaders(run.device)
    check_retrievable(data.retrieval_sets)  # before training: a set with nothing to retrieve fails now
    retrieval = data.retrieval_loaders()
    retrieved = [name for name, _, _ in tasks(retrieval)]
    best_key = selection_metric(
        str(cfg.trainer.best_on), verifiers, val_loader is not None, test_loader is not None, retrieved
    )
    if run.dist.is_main:
        say_selection(best_key, has_val=val_loader is not None)
    evaluated = [
        (split, loader) for split, loader in (("val", val_loader), ("test", test_loader)) if loader is not None
    ]
    sharded = criterion.sharded and run.dist.enabled  # the head's weights differ per rank
    run.prec.check_sharded(sharded)  # fp16's loss scaling needs every rank's whole gradient
    forward, eval_model, eval_forward = training_views(
        cfg, model, criterion, run, data.num_classes, classifies=bool(evaluated), head_spec=head_spec
    )
    optimizer = builders.build_optimizer(cfg, model)
    scheduler = builders.build_scheduler(cfg, optimizer, len(train_loader))
    return Job(
        data,
        model,
        criterion,
        train_loader,
        evaluated,
        probe_split=evaluated[-1][0] if evaluated else None,
        best_key=best_key,
        verifiers=verifiers,
        retrieval=retrieval,
        forward=forward,
        eval_model=eval_model,
        eval_forward=eval_forward,
        optimizer=optimizer,
        scheduler=scheduler,
        watch=watch,
        warnings=warnings,
        sharded=sharded,
    )


def say_selection(best_key: str, has_val: bool) -> None:
    """What best.pt is chosen on, when it is not a validation metric."""
    if best_key.startswith("test/"):  # test/acc, or a retrieval test set's test/map_at_r
        print(
            "marginlab: warning: trainer.best_on=test: best.pt and best/* are chosen on the test split, so "
            f"best/{best_key} is optimistic; use a validation split (dataset.val_fraction > 0) for a table"
        )
    elif best_key == "epoch" and not has_val:
        print(
            "marginlab: no validation split: best.pt is the last epoch and a sweep has no objective "
            "(set dataset.val_fraction > 0, or trainer.best_on=test to select on test, labelled optimistic)"
        )


def training_views(
    cfg: DictConfig,
    model: MarginModel,
    criterion: MarginLoss,
    run: Run,
    num_classes: int,
    classifies: bool,
    head_spec: HeadSpec,
):
    """(forward for training, model for evaluation, forward for evaluation).

    Plain heads: the whole model is compiled and/or wrapped in DDP. A sharded head (Partial FC) synchronises itself
    and holds a different shard on every rank, so only the backbone is; when there is a validation set
    (``classifies``) rank 0 evaluates with an unsharded copy of the head, its weights gathered each evaluated
    epoch (``sync_eval_head``). Face data sets have none: verification needs the backbone alone.
    """
    dist, device = run.dist, run.device
    ddp_args = {"device_ids": [device.index] if device.type == "cuda" else None}
    if not criterion.sharded:
        forward = torch.compile(model) if cfg.trainer.compile else model
        if dist.enabled:  # gradients averaged across ranks; evaluation runs on rank 0 without DDP's collectives
            return DistributedDataParallel(forward, **ddp_args), model, model
        return forward, model, forward
    body = torch.compile(model.backbone) if cfg.trainer.compile else model.backbone
    forward = MarginModel(
        DistributedDataParallel(body, **ddp_args) if dist.enabled else body, model.head, model.regularizers
    )
    eval_head = criterion.margin_head  # one rank: its shard is every class
    if dist.enabled:
        eval_head = None
        if classifies and dist.is_main:
            with torch.random.fork_rng(devices=[]):  # the copy's random init must not shift rank 0's random stream
                eval_head = builders.build_head(
                    head_spec, criterion.margin_head.in_features, num_classes, shard=False
                ).to(device)
    eval_model = MarginModel(model.backbone, eval_head, model.regularizers)
    return forward, eval_model, eval_model


def start_or_resume(cfg: DictConfig, run: Run, job: Job) -> LoopState:
    """A fresh LoopState, or (``resume=``) the checkpoint's, its weights, optimizer, schedule and random state
    restored; a resume that gets here starts training, so it is recorded and its run directory tidied."""
    if not cfg.resume:
        return LoopState()
    state = load_training_state(
        Path(cfg.resume),
        job.model,
        job.optimizer,
        job.scheduler,
        run.prec,  # the GradScaler's state
        job.criterion,
        map_location=run.prec.device,
    )
    if run.dist.is_main:  # every check has passed (marginlab/training/resume.py): the resume starts training
        given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
        record_resume(run.dir, [o for o in given if not o.startswith("resume=")], state.epoch)
        OmegaConf.save(cfg, run.dir / ".hydra" / "config.yaml", resolve=True)
        prepare_resumed_run(run.dir, state.epoch)  # no temp file of a killed save, no epoch record ahead of it
    return state


# ---------------------------------------------------------------- one epoch
def loop_options(cfg: DictConfig, run: Run) -> LoopOptions:
    return LoopOptions(
        grad_clip=cfg.trainer.grad_clip,
        max_nonfinite=cfg.trainer.max_nonfinite_steps,
        channels_last=run.channels_last,
        log_every=cfg.logger.log_every_n_steps,
        progress=run.progress,
    )


def train_epoch(
    cfg: DictConfig, run: Run, job: Job, state: LoopState, log: RunLog, epoch: int, saved: tuple[Path, int] | None
) -> dict:
    """One pass over the training set; the epoch's record so far. Non-finite weights stop the run (and are never
    evaluated or saved), the message saying where the last finite ones are."""
    job.data.set_epoch(epoch)
    try:
        stats = train_one_epoch(
            StepParts(job.model, job.optimizer, job.scheduler, job.criterion, job.forward),
            job.train_loader,
            run.prec,
            state,
            loop_options(cfg, run),
            log=log,
            desc=f"epoch {epoch + 1}/{cfg.trainer.epochs}",
            dist=run.dist,
        )
        check_finite_state(job.model, epoch + 1, run.dist)
    except TrainingError as err:
        raise TrainingError(f"{err}; {finite_weights_note(saved)}") from None
    return {"epoch": epoch + 1, "step": state.step, **{f"train/{k}": v for k, v in stats.items()}}


def gather_state(cfg: DictConfig, job: Job, syncing: bool) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) in the unsharded layout, when a checkpoint or the evaluation head needs
    them; collectives when sharded (every rank calls), None off rank 0 then."""
    if not (cfg.trainer.checkpoint or syncing):
        return None, None
    model_state = sharded_state.model_state_dict(job.model)
    optimizer_state = sharded_state.optimizer_state_dict(job.optimizer, job.model) if cfg.trainer.checkpoint else None
    return model_state, optimizer_state


def evaluate_epoch(
    cfg: DictConfig, run: Run, job: Job, state: LoopState, log: RunLog, probe, model_state: dict | None, epoch: int
) -> dict:
    """Rank 0: each split's loss and accuracy (the probe's split: its geometry too), each verification set, each
    retrieval set (``<set>/map_at_r``, ...)."""
    if job.syncs_eval_head:
        sync_eval_head(job.eval_model, model_state)
    record = {}
    for split, loader in job.evaluated:
        probed = split == job.probe_split
        stats = evaluate(
            job.eval_model,
            loader,
            run.prec,
            channels_last=run.channels_last,
            probe_max_samples=cfg.logger.probe_max_samples if probed else 0,
            forward=job.eval_forward,
            probe=probe if probed else None,
        )
        if probed:
            stats.update(probe.end_epoch(epoch + 1, state.step, job.eval_model.head))
        else:
            stats = {"loss": stats["loss"], "acc": stats["acc"]}
        record.update({f"{split}/{k}": v for k, v in stats.items()})
    if job.verifiers:  # lfw/acc, lfw/auc, ... and figures/roc_<name>.png
        record.update(
            run_verifiers(
                job.verifiers,
                job.model.backbone,
                job.data.image_size,
                run.device,
                figures_dir=run.dir / "figures" if cfg.logger.figures else None,
                writer=log.writer,
                step=state.step,
                epoch=epoch + 1,
            )[0]
        )
    if job.retrieval:  # test/precision_at_1, test/map_at_r, ... of the trunk's embedding (eval/retrieval_sets.py)
        record.update(
            run_retrieval(
                job.retrieval,
                job.model.backbone,
                run.device,
                autocast=run.prec.autocast,
                channels_last=run.channels_last,
            )[0]
        )
    return record


def sync_eval_head(eval_model: MarginModel, model_state: dict) -> None:
    """Rank 0's unsharded evaluation head takes the gathered weights of the Partial FC shards."""
    eval_model.head.load_state_dict({k[len("head.") :]: v for k, v in model_state.items() if k.startswith("head.")})


def log_epoch(record: dict, watch: CollapseWatch, log: RunLog, step: int, epochs: int, env: dict | None = None) -> None:
    """TensorBoard scalars, the collapse watch's warnings, metrics.jsonl (with ``env`` as its ``environment``)
    and the per-epoch line."""
    log.scalars({k: v for k, v in record.items() if k not in ("epoch", "step")}, step)
    warnings = watch.check(record)  # collapse: class weights, chance accuracy, feature norms (collapse.py)
    if warnings:
        record["warnings"] = warnings
    if env:
        record["environment"] = env
    log.epoch_record(record)
    log.epoch_line(record, epochs, warnings)  # console (terminal or not) and train.log


def select_best(record: dict, best_key: str, state: LoopState) -> bool:
    """True when this epoch is the best so far on ``best_key`` (kept in ``state``)."""
    if not record.get(best_key, -math.inf) > state.best_metric:
        return False
    state.best_metric, state.best_record = record[best_key], selected_metrics(record)
    return True


def save_epoch(
    cfg: DictConfig,
    run: Run,
    job: Job,
    state: LoopState,
    model_state: dict | None,
    optimizer_state: dict | None,
    is_best: bool,
) -> Path:
    """Rank 0 writes last.pt (and best.pt); returns where last.pt is."""
    ckpt_dir = run.dir / CHECKPOINT_DIR
    if not run.dist.is_main:
        return ckpt_dir / "last.pt"
    payload = checkpoint_payload(
        model_state,
        optimizer_state,
        job.scheduler,
        run.prec,  # the GradScaler's state
        state,
        cfg,
        job.data,
        job.criterion.checkpoint_entries(),
    )
    return save_checkpoints(payload, ckpt_dir, is_best)


# ---------------------------------------------------------------- the end
def run_summary(cfg: DictConfig, run: Run, job: Job, state: LoopState, record: dict, wall_time_s: float) -> dict:
    """What metrics.json holds: status, the selected epoch's metrics, the last epoch's record, the warnings."""
    key = job.best_key
    return {
        "status": "completed" if state.epoch >= cfg.trainer.epochs else "stopped",
        "run_dir": str(run.dir),
        "epochs_done": state.epoch,
        "steps": state.step,
        "best_metric": key,
        "best/" + key: state.best_metric,
        **{f"best/{k}": v for k, v in state.best_record.items()},
        "nonfinite_steps": state.nonfinite_total,
        "device": str(run.device),
        "precision": run.prec.name,
        "wall_time_s": wall_time_s,
        **record,
        "warnings": job.warnings + job.watch.first_warnings(),
        "environment": environment(run.device),  # threads, versions, device, commit: what else decides the floats
    }


def run(cfg: DictConfig) -> float:
    """The Hydra task: every failure is recorded in a failed metrics.json. User errors, out of memory and files
    the system refuses to write become one clear line (exit 2), a bug its traceback too (exit 1); Ctrl-C records
    an interrupted metrics.json (exit 130). In a multirun the sweep goes on (marginlab/training/sweep.py), but not past
    Ctrl-C. A resume touches nothing of the run until it starts training."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    lock = resumes = None

    def started() -> bool:  # a resume is recorded once it starts training; until then the run stays as it was
        touched = not cfg.resume or (resumes is not None and len(read_history(run_dir)) > resumes)
        return lock is not None and touched

    try:
        lock = RunLock(run_dir)  # one process trains a run at a time: refused before any file of the run changes
        if cfg.resume:  # checked again under the lock: another resume may have trained the run meanwhile
            resumes = len(read_history(run_dir))
            done = recheck_resume(cfg, run_dir)
            if done:
                print(f"marginlab: {done}; {run_dir} is unchanged")
                return float("nan")
        with kept_threads():  # the run sets trainer.num_threads; the next job of a sweep starts from this count
            summary = train(cfg, run_dir)
    except KeyboardInterrupt as err:
        summary = err.summary if isinstance(err, Interrupted) else None
        # a summary the run wrote as it ended (Ctrl-C while its trackers upload) is kept
        if started() and (summary is not None or not (run_dir / "metrics.json").exists()):
            write_json(run_dir / "metrics.json", summary or {"status": "interrupted", "run_dir": str(run_dir)})
        print(interrupted_line(run_dir, summary, cfg.trainer.epochs), file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        message = sweep.record_failure(run_dir, err, write=started())
        code = 2 if error_kinds.is_user_error(err) else 1
    else:
        return objective(summary)
    finally:
        if lock is not None:
            lock.release()
    sweep.free_memory()  # the failed run's tensors are unreachable once the exception is gone
    if multirun:
        return sweep.failed_job_result(message)
    raise SystemExit(code)


def interrupted_line(run_dir: Path, summary: dict | None, epochs: int) -> str:
    """Ctrl-C in one line: the epochs done (once training started) and whether ``resume=`` can continue the run."""
    done = f" after {summary['epochs_done']}/{epochs} epochs" if summary else ""
    resumable = (run_dir / CHECKPOINT_DIR / "last.pt").is_file()
    way_on = f"resume={run_dir} continues it" if resumable else "it has no checkpoint to resume from"
    return f"marginlab: interrupted{done}; {way_on}"
