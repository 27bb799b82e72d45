"""``marginlab reproduce <experiment> [overrides]``: every sweep of an experiment into one sweep directory, then its
table (``marginlab report``) and, for the feature figures, ``marginlab plot``.

An experiment carries its sweeps in its YAML, each a multirun's axes written as Hydra's ``hydra.sweeper.params``
(key: comma-separated values; lightning-hydra-template's form), several where one table needs several multiruns:

    reproduce:
      sweeps:                                     # one `marginlab train -m` each, all into one sweep directory
        - {m: "1,2,3,4", seed: "0,1,2"}
        - {head: softmax, "~head.lr_mult": null}  # ~key: Hydra's deletion; experiment: another experiment's recipe
      plot: true                                  # then `marginlab plot <sweep dir>` (2-D / 3-D feature figures)

A sweep runs ``marginlab train -m experiment=<name> <its axes> <overrides>`` (an override of a swept key replaces
that axis: ``seed=0`` runs one seed) into ``outputs/sweeps/<name>/<date_time>/`` (``MARGINLAB_OUTPUT_DIR``).
Each job sets torch's thread count from its own config (``trainer.num_threads``; float results depend on it), so a
job gives the same numbers here and under ``marginlab train -m``. Every job of every sweep is composed before the
first starts: a value that does not compose starts nothing (exit 2). Exit 1 when a job failed or the table or the
figures could not be made; each step runs regardless.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marginlab.errors import ConfigError, MarginlabError

EXPERIMENTS = Path(__file__).parent.parent / "configs" / "experiment"
SPEC_KEYS = ("sweeps", "plot")
#: an override value Hydra reads unquoted
PLAIN_VALUE = re.compile(r"[\w./:@+-]+")


@dataclass(frozen=True)
class Spec:
    """An experiment's ``reproduce:`` block: its sweeps (each ``marginlab train -m`` overrides, no extras)."""

    name: str
    sweeps: list[list[str]]
    plot: bool = False
    paper: str = ""  # "<source>: <table>" of its paper: block


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def override(key: str, value: Any) -> str:
    """One ``key=value`` override from a ``hydra.sweeper.params``-style entry (``~key: null`` deletes ``key``)."""
    if value is None:
        return key if key.startswith("~") else f"{key}=null"
    if isinstance(value, bool):
        return f"{key}={str(value).lower()}"
    if isinstance(value, (list, tuple)):
        return f"{key}=[{','.join(str(v) for v in value)}]"
    return f"{key}={value}"


def sweep_overrides(name: str, index: int, params: Any) -> list[str]:
    """``experiment=<name>`` (or the sweep's own ``experiment``) and the sweep's axes as overrides."""
    where = f"experiment={name}: reproduce.sweeps[{index}]"
    if not isinstance(params, dict) or not params:
        raise ConfigError(
            f"{where} must be a mapping of override keys to values (as hydra.sweeper.params, e.g. "
            f'{{m: "1,2,3,4", seed: "0,1,2"}}), got {params!r}'
        )
    bad = [k for k, v in params.items() if not isinstance(k, str) or isinstance(v, dict)]
    if bad:
        raise ConfigError(f"{where}: {bad[0]!r} is not allowed: give each key one value or a comma-separated list")
    experiment = params.get("experiment", name)
    if experiment not in experiment_names():
        raise ConfigError(
            f"{where}: experiment={experiment!r} does not exist; choose one of {', '.join(experiment_names())}"
        )
    return [f"experiment={experiment}", *(override(k, v) for k, v in params.items() if k != "experiment")]


def paper_title(paper: Any) -> str:
    """``<source>: <table>`` of a ``paper:`` block (the entries' tables when the block has none)."""
    if not isinstance(paper, dict):
        return ""
    entries = [e for e in paper.get("results") or [] if isinstance(e, dict)]
    sources = list(dict.fromkeys(str(x) for x in [paper.get("source"), *(e.get("source") for e in entries)] if x))
    tables = list(dict.fromkeys(str(x) for x in [paper.get("table"), *(e.get("table") for e in entries)] if x))
    return ": ".join(filter(None, ["; ".join(sources), "; ".join(tables)]))


def read_spec(name: str) -> Spec:
    """The experiment's ``reproduce:`` block, composed as ``marginlab train experiment=<name>`` composes it."""
    return read_specs([name])[0]


def read_specs(names: list[str]) -> list[Spec]:
    """``read_spec`` of several experiments, Hydra initialised once."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import marginlab.config  # noqa: F401  (the schema and resolvers)

    unknown = [name for name in names if name not in experiment_names()]
    if unknown:
        raise ConfigError(
            f"unknown experiment {unknown[0]!r}; choose one of {', '.join(experiment_names())} "
            "(marginlab reproduce --list)"
        )
    specs = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("marginlab.configs", version_base="1.3"):
            for name in names:
                cfg = compose("train", overrides=[f"experiment={name}"])
                block = OmegaConf.to_container(cfg.reproduce) if cfg.get("reproduce") is not None else None
                paper = OmegaConf.to_container(cfg.paper, resolve=True) if cfg.get("paper") is not None else None
                specs.append(spec_of(name, block, paper))
    finally:
        GlobalHydra.instance().clear()
    return specs


def spec_of(name: str, block: Any, paper: Any = None) -> Spec:
    """Checks a ``reproduce:`` block (ConfigError naming the key) and turns its sweeps into overrides."""
    where = f"experiment={name}: reproduce"
    if not isinstance(block, dict) or not block.get("sweeps"):
        raise ConfigError(
            f"{where}.sweeps is missing: the experiment lists no sweep to run "
            f'(a list of mappings such as {{m: "1,2,3,4", seed: "0,1,2"}})'
        )
    unknown = sorted(set(block) - set(SPEC_KEYS))
    if unknown:
        moved = " (the thread count is trainer.num_threads, the same for train -m)" if "num_threads" in unknown else ""
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {', '.join(SPEC_KEYS)}{moved}")
    if not isinstance(block["sweeps"], list):
        raise ConfigError(f"{where}.sweeps must be a list of mappings, got {block['sweeps']!r}")
    plot = block.get("plot", False)
    if not isinstance(plot, bool):
        raise ConfigError(f"{where}.plot={plot!r} is not allowed: give true or false")
    sweeps = [sweep_overrides(name, i, params) for i, params in enumerate(block["sweeps"])]
    return Spec(name=name, sweeps=sweeps, plot=plot, paper=paper_title(paper))


def expand(overrides: list[str]) -> list[list[str]]:
    """Every job of ``marginlab train -m <overrides>``, in Hydra's order (its basic sweeper's own expansion; a key
    given twice keeps its last value)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def quoted(value: str) -> str:
    """A value in Hydra's override grammar: as it is when plain, else single-quoted."""
    if PLAIN_VALUE.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def new_sweep_dir(name: str) -> Path:
    """``<outputs>/sweeps/<name>/<date_time>``, created exclusively (``-1``, ``-2``, ... when taken)."""
    from marginlab.run_dirs import claim_dir

    root = Path(os.environ.get("MARGINLAB_OUTPUT_DIR", "outputs"))
    return Path(claim_dir(root / "sweeps" / name / time.strftime("%Y-%m-%d_%H-%M-%S")))


def check_jobs(commands: list[list[str]]) -> None:
    """Composes every job of every sweep before the first starts: a ConfigError listing each bad value."""
    from marginlab.error_kinds import bad_jobs

    bad = [f"sweep {i}: {line}" for i, command in enumerate(commands, 1) for line in bad_jobs(command)]
    if bad:
        raise ConfigError(
            "the experiment's sweeps have values that do not fit the config; no job was started:\n  " + "\n  ".join(bad)
        )


def selected(spec: Spec, which: str | None) -> list[int]:
    """The sweeps to run (1-based, ``--sweeps 1,3``); all by default."""
    if not which:
        return list(range(1, len(spec.sweeps) + 1))
    try:
        chosen = [int(x) for x in which.split(",") if x.strip()]
    except ValueError:
        chosen = []
    if not chosen or any(not 1 <= i <= len(spec.sweeps) for i in chosen):
        raise ConfigError(
            f"--sweeps {which!r} is not allowed: give sweep numbers from 1 to {len(spec.sweeps)} "
            f"separated by commas (marginlab reproduce {spec.name} --dry-run lists them)"
        )
    return sorted(set(chosen))


def print_list() -> None:
    specs = read_specs(experiment_names())
    width = max(len(s.name) for s in specs)
    print(f"{'experiment'.ljust(width)}  jobs  paper table")
    for s in specs:
        jobs = sum(len(expand(sweep)) for sweep in s.sweeps)
        print(f"{s.name.ljust(width)}  {jobs:4d}  {s.paper or '-'}")
    print("\nmarginlab reproduce <experiment> [overrides] runs one; --dry-run prints its sweeps")


def print_plan(spec: Spec, chosen: list[int], commands: list[list[str]]) -> None:
    jobs = [len(expand(command)) for command in commands]
    print(
        f"marginlab reproduce {spec.name}: {len(commands)} sweep(s), {sum(jobs)} jobs"
        + (f" ({spec.paper})" if spec.paper else "")
    )
    for i, command, n in zip(chosen, commands, jobs):
        print(f"  {i}. marginlab train -m {shlex.join(command)}   # {n} job(s)")
    then = ["marginlab report <sweep dir>", *(["marginlab plot <sweep dir>"] if spec.plot else [])]
    print(
        f"  into {Path(os.environ.get('MARGINLAB_OUTPUT_DIR', 'outputs')) / 'sweeps' / spec.name}/<date_time>, "
        f"then {'; '.join(then)}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="marginlab reproduce",
        description="Run every sweep of an experiment (its reproduce.sweeps) into one sweep directory, "
        "outputs/sweeps/<experiment>/<date_time>, then marginlab report on it (and marginlab plot "
        "for the feature figures). Exit 1 when a job failed.",
        epilog="examples: marginlab reproduce --list; "
        "marginlab reproduce lsoftmax_mnist trainer.device=cuda trainer.device_index=1; "
        "marginlab reproduce digits_2d_comparison trainer.epochs=5 --dry-run",
    )
    p.add_argument("experiment", nargs="?", help="an experiment name (configs/experiment/<name>.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides for every job (one replacing a swept key replaces that axis, e.g. seed=0)",
    )
    p.add_argument("--list", action="store_true", help="list the experiments, their job counts and paper tables")
    p.add_argument("--dry-run", action="store_true", help="print the sweeps' commands and job counts; run nothing")
    p.add_argument("--sweeps", metavar="N[,N...]", help="run only these sweeps (numbered as --dry-run shows them)")
    return p


def main(args: list[str], commands: dict[str, Callable[[list[str]], int]]) -> int:
    """``commands``: the CLI's ``train``, ``report`` and ``plot`` (each takes its arguments, returns its exit code)."""
    opts = parser().parse_intermixed_args(args)
    if opts.list:
        print_list()
        return 0
    if not opts.experiment:
        raise ConfigError("reproduce: name an experiment (marginlab reproduce --list shows them)")
    spec = read_spec(opts.experiment)
    chosen = selected(spec, opts.sweeps)
    runs = [[*spec.sweeps[i - 1], *opts.overrides] for i in chosen]
    if opts.dry_run:
        print_plan(spec, chosen, runs)
        return 0
    check_jobs(runs)
    sweep_dir = new_sweep_dir(spec.name)
    print(f"marginlab reproduce {spec.name}: {len(runs)} sweep(s) into {sweep_dir}", flush=True)
    status = 0
    for i, run in zip(chosen, runs):  # each job sets its own torch threads (trainer.num_threads), as under train -m
        print(f"marginlab reproduce: sweep {i}: marginlab train -m {shlex.join(run)}", flush=True)
        status |= step(commands["train"], ["-m", *run, f"hydra.sweep.dir={quoted(str(sweep_dir))}"])
    status |= step(commands["report"], [str(sweep_dir), *report_axes([spec.sweeps[i - 1] for i in chosen])])
    if spec.plot:
        status |= step(commands["plot"], [str(sweep_dir)])
    return 1 if status else 0


def report_axes(sweeps: list[list[str]]) -> list[str]:
    """``--axis`` for the report: the keys the sweeps set that the report would otherwise call confounders (e.g.
    ``backbone=sfnet64`` beside the default backbone): the experiment compares them on purpose."""
    from marginlab.report.settings import is_confounder

    keys = [item.partition("=")[0].lstrip("+~") for sweep in sweeps for item in sweep]
    axes = list(dict.fromkeys(k for k in keys if is_confounder(k)))
    return ["--axis", ",".join(axes)] if axes else []


def step(command: Callable[[list[str]], int], args: list[str]) -> int:
    """One command of the recipe: 0 when it succeeded, else 1 (its one-line error printed) and the recipe goes on."""
    try:
        return 1 if command(args) else 0
    except MarginlabError as err:
        print(f"marginlab: error: {err}", file=sys.stderr, flush=True)
        return 1
