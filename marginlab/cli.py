"""``marginlab <command> [overrides]``: pops the command and hands the rest to Hydra."""

from __future__ import annotations

import sys

from marginlab.errors import MarginlabError

USAGE = """usage: marginlab <command> [options] [key=value ...]

Train and compare margin-based softmax losses (SphereFace, AM-Softmax/CosFace, ArcFace,
L-Softmax, NormFace, center loss, RBF-Softmax, ...) under one trainer.

commands:
  train     train a backbone + margin head on a dataset (Hydra overrides: head=arcface m=0.5 s=64)
            -m / --multirun sweeps every combination: marginlab train -m head=arcface,cosface seed=0,1
            marginlab train --help lists every config group and its options
  version   print the version

examples:
  marginlab train                                   # digits default: no download, ~1 min on 2 CPU cores
  marginlab train head=amsoftmax m=0.35 s=30
  marginlab train dataset=cifar10 backbone=resnet20 head=arcface trainer.epochs=200
  marginlab train resume=latest                     # continue the newest run in its own directory
"""

COMMANDS = {}


def command(name):
    def register(func):
        COMMANDS[name] = func
        return func
    return register


@command("train")
def train_command(args: list[str]) -> int:
    from marginlab.resume import expand_resume
    from marginlab.train import hydra_main

    if not any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c") for a in args):
        args = expand_resume(args)
    sys.argv = ["marginlab train", *args]
    hydra_main()
    return 0


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


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
