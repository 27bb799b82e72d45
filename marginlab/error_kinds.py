"""What kind of error a failure is (the user's config, the machine, out of memory, or a bug) and its one line.

The CLI (which turns Hydra's errors into ``marginlab: error: ...``) and a run's failure record
(``marginlab.training.sweep.record_failure``) both classify through here."""

from __future__ import annotations

from pathlib import Path

from marginlab.errors import ConfigError, MarginlabError


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def is_environment_error(err: BaseException) -> bool:
    """An error of the machine, not of the code: the system refused a file operation (disk full, no permission,
    read-only file system, a file where a directory should be...); it carries an errno, or is torch's wrapped
    write failure (marginlab/run_dirs.py)."""
    from marginlab.run_dirs import system_cause

    return system_cause(err) is not None


def is_unresolved_value(err: BaseException) -> bool:
    """A config value that cannot be resolved where the run reads it (``${nope}``, ``???``): the user's config."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    return isinstance(err, (InterpolationResolutionError, MissingMandatoryValue))


def is_user_error(err: BaseException) -> bool:
    """Errors reported as one line (no traceback): the user's input or the machine, not a bug."""
    return (
        isinstance(err, MarginlabError)
        or is_out_of_memory(err)
        or is_environment_error(err)
        or is_unresolved_value(err)
    )


def describe(err: BaseException, run_dir: Path | None = None) -> str:
    """The one-line message for a failed run (in ``run_dir``)."""
    if isinstance(err, MarginlabError):
        return str(err)
    first = (str(err).strip().splitlines() or [""])[0]
    if is_out_of_memory(err):
        return (
            f"out of memory ({first}); lower dataset.batch_size, use trainer.precision=bf16, or pick a smaller backbone"
        )
    if is_unresolved_value(err):
        lines = [line.strip() for line in str(err).strip().splitlines()]
        return "; ".join(line for line in lines if line and not line.startswith(TYPE_LINES))
    if is_environment_error(err):
        from marginlab.run_dirs import output_error

        return str(output_error(err, f"the run's files in {run_dir}" if run_dir else "the run's files"))
    return f"{type(err).__name__}: {first}"


# ---------------------------------------------------------------- errors of the config itself
def is_config_error(err: BaseException) -> bool:
    """Hydra / OmegaConf could not parse the overrides or compose the config (unknown option or key, a value of the
    wrong type, bad syntax): the user's input. Only errors raised outside the task (``marginlab.training.train.run``
    catches everything raised inside it) are classified so."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, (HydraException, OmegaConfBaseException))


def marginlab_cause(err: BaseException) -> MarginlabError | None:
    """The MarginlabError behind ``err`` (e.g. raised by a resolver, which OmegaConf wraps), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, MarginlabError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


#: lines of OmegaConf's messages that name its internal types, not the user's key
TYPE_LINES = ("object_type=", "reference_type=")


def describe_config_error(err: BaseException, compact: bool = False) -> str:
    """Hydra's message (its list of available options kept, its search path dropped) and OmegaConf's cause (with
    ``full_key``) without a traceback; ``compact``: all on one line."""
    text = str(err).split("Config search path:")[0].strip()
    if compact or "Available options" not in text:
        text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    cause = err.__cause__
    if cause is not None and cause is not err:
        from omegaconf.errors import OmegaConfBaseException

        if isinstance(cause, OmegaConfBaseException):
            lines = [line.strip() for line in str(cause).strip().splitlines()]
            text += " (" + "; ".join(line for line in lines if line and not line.startswith(TYPE_LINES)) + ")"
    return text


def bad_jobs(overrides: list[str]) -> list[str]:
    """Composes every job of ``marginlab train -m <overrides>``; one line per distinct reason a job does not
    compose (it names the bad value) with its number of jobs. Empty when the sweep cannot be expanded here."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from marginlab.override_hints import with_hint  # did you mean 'trainer.epochs'?

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - the caller reports Hydra's own error instead
        return []
    errors: dict[str, int] = {}
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("marginlab.configs", version_base="1.3", job_name="train"):
            for job in jobs:
                try:
                    compose("train", overrides=job, return_hydra_config=True)
                except Exception as err:  # noqa: BLE001 - every kind of composition error is listed
                    message = with_hint(err, describe_config_error(err, compact=True))
                    errors[message] = errors.get(message, 0) + 1
    finally:
        GlobalHydra.instance().clear()
    return [f"{message} [{n} of {len(jobs)} jobs]" for message, n in errors.items()]


def sweep_config_error(err: BaseException, overrides: list[str]) -> MarginlabError:
    """A sweep whose jobs do not all compose starts no job: the error lists every bad job, not just the first."""
    bad = bad_jobs(overrides)
    if not bad:
        return ConfigError(describe_config_error(err))
    return ConfigError("the sweep has values that do not fit the config; no job was started:\n  " + "\n  ".join(bad))
