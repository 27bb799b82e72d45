"""``marginlab export``: the help page is marginlab/export/__init__.py's docstring."""

from __future__ import annotations

import marginlab.export
from marginlab.command_args import run_command


def main(args: list[str]) -> int:
    return run_command(marginlab.export.__doc__, marginlab.export.export, args)
