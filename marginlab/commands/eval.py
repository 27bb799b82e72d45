"""``marginlab eval``: the help page is marginlab/eval/standalone.py's docstring."""

from __future__ import annotations

from marginlab.command_args import run_command
from marginlab.eval import standalone


def main(args: list[str]) -> int:
    return run_command(standalone.__doc__, standalone.evaluate_checkpoint, args)
