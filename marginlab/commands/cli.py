"""``marginlab <command> [overrides]``: pops the command and hands the rest to Hydra."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

from marginlab.errors import ConfigError, MarginlabError, OutputError

USAGE = """usage: marginlab <command> [options] [key=value ...]

Train and compare margin-based softmax losses (SphereFace, AM-Softmax/CosFace, ArcFace,
L-Softmax, NormFace, center loss, RBF-Softmax, ...) under one trainer.

commands:
  train     train a backbone + margin head on a dataset (Hydra overrides: head=arcface m=0.5 s=64)
            -m / --multirun sweeps every combination: marginlab train -m head=arcface,cosface seed=0,1
            marginlab train --help lists every config group and its options
            a sweep exits with 1 when a job failed; each job's metrics.json says why
  eval      score a saved model on face verification sets (InsightFace protocol), JSON next to it
            marginlab eval checkpoint=<checkpoint.pt or run dir> verification=[lfw,cfp_fp,agedb_30]
            retrieval=true: a metric-learning run's unseen classes (P@1, MAP@R, Recall@k)
  export    the backbone alone, checked, with a JSON sidecar (input size, normalisation, embedding size)
            marginlab export checkpoint=<run dir or .pt> format=onnx|torchscript|state_dict|insightface [out=<file>]
  embed     embeddings of an image folder, a .rec or a .bin (.npy + a .tsv index of names and labels)
            marginlab embed checkpoint=<run dir or .pt> input=<folder|.rec|.bin> out=<file.npy> [flip=true]
  align     112x112 ArcFace crops of your photos, from five landmarks per image (eyes, nose, mouth corners)
            marginlab align input=<image folder> landmarks=<file: path x1 y1 ... x5 y5> out=<folder>
  report    one table of a sweep or of run dirs: a row per setting, mean ± 95% CI over seeds, tests against the
            best row, the paper's numbers; report.md, .csv and .tex (refuses runs that differ in epochs, lr, data...)
            marginlab report outputs/sweeps/train/<date_time> [--metrics test/acc,lfw/acc] [--out DIR] [--allow-mixed]
  reproduce a paper's table: every sweep of an experiment into one sweep dir, then its report (exit 1: a job failed)
            marginlab reproduce <experiment> [overrides] ; marginlab reproduce --list
  plot      re-render a run's geometry figures (marginlab plot <run dir>), or compare the runs of a
            sweep side by side (marginlab plot <sweep dir> -> features_grid.png, target_angles.png)
  version   print the version

tab completion (bash; zsh with install=zsh): eval "$(marginlab train --shell-completion install=bash)"

exit codes: 0 done; 2 a user or environment error, one line `marginlab: error: ...` (a bad value, override or
  option, unreadable data, a file the system refuses to write); 1 a bug (traceback), or a sweep with failed jobs

examples:
  marginlab train                                   # digits default: no download, ~10 s (README: first_run)
  marginlab train head=amsoftmax m=0.35 s=30
  marginlab train dataset=cifar10 head=arcface      # the set's own picks: ResNet-20, 164 epochs
  marginlab train resume=latest                     # continue the newest run in its own directory
  marginlab train init_from=<run dir> dataset=casia  # a new run starting from a checkpoint's weights
"""

COMMANDS = {}


def command(name):
    def register(func):
        COMMANDS[name] = func
        return func

    return register


#: Hydra options that only print (help, config, completion): `marginlab train` answers them without importing torch
PRINT_ONLY = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc")


@command("train")
def train_command(args: list[str]) -> int:
    if args in (["--help"], ["-h"]):  # Hydra's page without Hydra's slow group listing (commands/help_page.py)
        from marginlab.commands.help_page import train_help

        page = train_help(args)
        if page is not None:
            print(page)
            return 0
    from marginlab.commands import completion
    from marginlab.commands.train import (
        hydra_main,  # Hydra + the config schema; marginlab.training.train (torch) on demand
    )
    from marginlab.training import sweep

    request = completion.completion_request(args)  # -sc install=bash: our script (Hydra's calls `marginlab -sc`)
    if request is not None and request[0] != "query":
        print(completion.script(*request, commands=list(COMMANDS)), end="")
        return 0
    if request is not None:
        completion.drop_command_word()  # Hydra's query reads COMP_LINE as `<app> <overrides>`

    if not any(a in PRINT_ONLY for a in args):
        import marginlab.training.train  # noqa: F401  (torch and the trainer, before Hydra starts, as a run always did)
    if not any(a in ("-m", "--multirun", *PRINT_ONLY) for a in args):
        from marginlab.training.resume import expand_resume

        args = expand_resume(args)
        if args is None:  # a completed run: nothing to do, nothing touched
            return 0
    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: only rank 0 keeps a run directory (train.py shares it)
        args = [*args, f"hydra.run.dir={tempfile.mkdtemp(prefix='marginlab-rank')}", "hydra.output_subdir=null"]
    sys.argv = ["marginlab train", *args]
    sweep.LAST_SUMMARY = None
    with hydra_errors_raised():
        try:
            hydra_main()
        except Exception as err:  # from Hydra itself: marginlab.training.train.run handles everything raised in a run
            raise as_user_error(err, args) from None
    return sweep.exit_code()  # 1 when a multirun left failed jobs


@contextlib.contextmanager
def hydra_errors_raised():
    """Hydra prints its errors and exits with 1; HYDRA_FULL_ERROR makes it raise them, so they exit with 2."""
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved


def as_user_error(err: Exception, args: list[str]) -> Exception:
    """The one-line error of a bad config (or of a directory that cannot be created); a bug stays itself."""
    from marginlab import error_kinds as kinds

    cause = kinds.marginlab_cause(err)
    if cause is not None:
        return cause
    if isinstance(err, ValueError) and str(err).startswith("Only one of --run, --multirun"):
        return ConfigError(modes_conflict(args))
    if isinstance(err, AssertionError):  # OmegaConf's, for a key under a null node: logger.wandb.* without logger=wandb
        from marginlab.logging.tracker_options import unchosen_tracker

        return unchosen_tracker(args) or err
    if kinds.is_environment_error(err) and not kinds.is_config_error(err):
        return OutputError(kinds.describe(err))
    if not kinds.is_config_error(err):
        return err
    if any(a in ("-m", "--multirun") for a in args):
        return kinds.sweep_config_error(err, args)
    from marginlab.override_hints import with_hint  # did you mean 'trainer.epochs'?

    return ConfigError(with_hint(err, kinds.describe_config_error(err)))


#: Hydra's modes, of which a command takes one (its refusal of two is a ValueError)
MODES = {
    "-r": "--run",
    "--run": "--run",
    "-m": "--multirun",
    "--multirun": "--multirun",
    "-c": "--cfg",
    "--cfg": "--cfg",
    "-i": "--info",
    "--info": "--info",
    "-sc": "--shell-completion",
    "--shell-completion": "--shell-completion",
}


def modes_conflict(args: list[str]) -> str:
    """The line for two of Hydra's modes at once (``-m --cfg job``): Hydra prints one job's config, not a sweep's."""
    given = list(dict.fromkeys(MODES[a] for a in args if a in MODES))
    choices = ", ".join(dict.fromkeys(MODES.values()))
    line = f"{' and '.join(given) or 'these options'} cannot be combined: give one of {choices}"
    if "--multirun" in given and ("--cfg" in given or "--info" in given):
        line += "; to see a job's config, drop -m and give one value per key (marginlab train --cfg job seed=0)"
    return line


@command("eval")
def eval_command(args: list[str]) -> int:
    from marginlab.commands.eval import main as eval_main

    return eval_main(args)


@command("export")
def export_command(args: list[str]) -> int:
    from marginlab.commands.export import main as export_main

    return export_main(args)


@command("embed")
def embed_command(args: list[str]) -> int:
    from marginlab.commands.embed import main as embed_main

    return embed_main(args)


@command("align")
def align_command(args: list[str]) -> int:
    from marginlab.commands.align import main as align_main

    return align_main(args)


@command("report")
def report_command(args: list[str]) -> int:
    from marginlab.commands.report import main as report_main

    return report_main(args)


@command("reproduce")
def reproduce_command(args: list[str]) -> int:
    from marginlab.commands.reproduce import main as reproduce_main

    return reproduce_main(args, COMMANDS)


@command("plot")
def plot_command(args: list[str]) -> int:
    from marginlab.commands.plot import main as plot_main

    return plot_main(args)


@command("version")
def version_command(args: list[str]) -> int:
    from marginlab import __version__

    print(f"marginlab {__version__}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"marginlab: error: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return COMMANDS[name](args)
    except MarginlabError as err:
        print(f"marginlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a run's training (which records it itself: marginlab/training/train.py)
        print(f"marginlab: interrupted ({name})", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
