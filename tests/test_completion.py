"""Shell completion: the script `marginlab train -sc install=bash` prints, run in a real bash (issue #15)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marginlab.commands.cli import main

BASH = shutil.which("bash")

# try LINE WORD...: what bash passes to a completion function (COMP_WORDS split on COMP_WORDBREAKS as bash does)
DRIVER = """
eval "$(marginlab train --shell-completion install=bash)"
try() {
    COMP_LINE="$1"; COMP_POINT=${#1}; COMP_WORDS=("${@:2}"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
    _marginlab_completion
    printf '%s|%s\\n' "$1" "${COMPREPLY[*]}"
}
try "marginlab tr" marginlab tr
try "marginlab train hea" marginlab train hea
try "marginlab train head=arc" marginlab train head = arc
try "marginlab train trainer.epo" marginlab train trainer.epo
try "marginlab train head=arc" marginlab train head=arc
"""


def completed_lines(tmp_path: Path) -> list[tuple[str, list[str]]]:
    """COMP_LINE -> the line after bash puts each reply in place of the word under the cursor."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [BASH, "-c", DRIVER], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    return [(line.partition("|")[0], line.partition("|")[2].split()) for line in out.stdout.splitlines()]


@pytest.mark.skipif(
    BASH is None or not Path(sys.executable).with_name("marginlab").exists(),
    reason="needs bash and the installed marginlab script",
)
def test_bash_completion_function_completes_commands_groups_options_and_keys(tmp_path):
    (_, cmd_reply), (_, group_reply), (option, option_reply), (_, key_reply), (_, zsh_reply) = completed_lines(tmp_path)
    assert cmd_reply == ["train"]
    assert "head=" in group_reply
    assert option_reply == ["arcface"]  # bash replaces `arc` (after the `=` word break): head=arcface
    assert option[: -len("arc")] + option_reply[0] == "marginlab train head=arcface"
    assert key_reply == ["trainer.epochs="]
    assert zsh_reply == ["head=arcface"]  # zsh (bashcompinit) does not break words at `=`
    assert not (tmp_path / "outputs").exists()


def test_install_prints_marginlab_own_script_for_bash_and_zsh(capsys):
    assert main(["train", "--shell-completion", "install=bash"]) == 0
    bash = capsys.readouterr().out
    assert "complete -o nospace -o default -F _marginlab_completion marginlab" in bash
    assert "-sc query=bash" in bash and "marginlab -sc" not in bash  # Hydra's script called `marginlab -sc`
    assert main(["train", "-sc", "install=zsh"]) == 0
    zsh = capsys.readouterr().out
    assert zsh.startswith("autoload -Uz") and "bashcompinit" in zsh and bash in zsh


def test_unknown_shell_is_one_line_error(capsys):
    assert main(["train", "-sc", "install=fish"]) == 2
    err = capsys.readouterr().err
    assert "'install=fish'" in err and "bash, zsh" in err


def test_query_leaves_torch_unimported(tmp_path):
    check = (
        "import sys, marginlab.commands.cli\n"
        "try:\n    code = marginlab.commands.cli.main(['train', '-sc', 'query=bash'])\n"
        "except SystemExit as e:\n    code = e.code or 0\n"
        "print('CODE', code, 'TORCH', 'torch' in sys.modules)"
    )
    env = {**os.environ, "COMP_LINE": "marginlab train head=arc", "COMP_POINT": "24"}
    out = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "head=arcface" in out.stdout and "CODE 0 TORCH False" in out.stdout
