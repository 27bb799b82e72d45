"""Every shell command of the README and the docs pages either runs in a test or says it needs data or a GPU
(issue #26): a ``bash`` block line is a ``marginlab train`` line (composed and advised in test_readme_margins.py),
a help or listing command (run here), an install of an extra or a make target that exists (checked here), or it
carries ``needs data`` / ``needs a GPU`` on its own line or on a comment line of its block."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(r"needs (data|a GPU)")
#: commands cheap enough to run here, as the docs write them
RUN_HERE = {"marginlab --help", "marginlab train --help", "marginlab reproduce --list"}
#: commands a test of their own runs (in part), and which
RUN_ELSEWHERE = {"marginlab reproduce digits_2d_comparison": "test_reproduce.py: one step of every job"}


def bash_commands(page: Path) -> list[tuple[str, str, bool]]:
    """(page:line, the command without its comment, whether it or its block says it needs data or a GPU) of each
    command in the page's ``bash`` blocks, continuation lines joined and ``a ; b`` split."""
    out, block, block_commands, in_bash, pending = [], [], [], False, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if block:  # the block ends: a comment line in it marks every command of it
                marked = any(MARKED.search(text) for text in block if text.startswith("#"))
                out += [(where, command, flag or marked) for where, command, flag in block_commands]
            in_bash, block, block_commands = (stripped == "```bash" and not in_bash), [], []
            continue
        if not in_bash or not stripped:
            continue
        block.append(stripped)
        if stripped.startswith("#") and pending is None:
            continue
        pending = (pending[0], pending[1] + " " + stripped) if pending else (f"{page.name}:{number}", stripped)
        if not pending[1].endswith("\\"):
            command, _, comment = pending[1].partition("#")
            for part in command.replace("\\", " ").split(";"):
                block_commands.append((pending[0], " ".join(part.split()), bool(MARKED.search(comment))))
            pending = None
    return out


COMMANDS = [c for page in PAGES for c in bash_commands(page)]


def extras() -> set[str]:
    """The optional-dependency groups of pyproject.toml (read by hand: tomllib needs Python 3.11)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+) = \[", section, re.M))


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))


def test_the_pages_show_commands():
    assert len(COMMANDS) >= 30 and any(marked for _, _, marked in COMMANDS)


@pytest.mark.parametrize("where, command, marked", COMMANDS, ids=[f"{w} {c[:40]}" for w, c, _ in COMMANDS])
def test_every_command_runs_in_a_test_or_says_what_it_needs(where, command, marked):
    if marked:
        return
    words = shlex.split(command)
    if command.startswith("marginlab train") and "--help" not in words:
        return  # composed and advised: test_readme_margins.py
    if words[0] == "make":
        assert set(words[1:]) <= make_targets(), f"{where}: {command}: no such make target"
        return
    if words[:2] == ["pip", "install"]:
        named = {e for w in words[2:] for e in re.findall(r"marginlab\[([\w,]+)\]", w) for e in e.split(",")}
        assert named and named <= extras(), f"{where}: {command}: not an extra of pyproject.toml"
        return
    assert command in RUN_HERE | set(RUN_ELSEWHERE), (
        f"{where}: {command!r} runs in no test: mark it `# needs data` or `# needs a GPU`"
    )


@pytest.mark.parametrize("command", sorted(RUN_HERE))
def test_the_help_and_listing_commands_run(command, capsys):
    assert run_cli(*shlex.split(command)[1:]) == 0
    assert capsys.readouterr().out.strip()
