"""Shell completion of ``marginlab``: its commands, and ``train``'s config groups, options and keys (bash, zsh).

``marginlab train --shell-completion install=bash`` (or ``install=zsh``) prints a script defining
``_marginlab_completion``; ``eval "$(marginlab train -sc install=bash)"`` in ~/.bashrc (or ~/.zshrc) enables it.
The first word completes from the command list; after ``train`` the script asks
``marginlab train -sc query=bash``, which Hydra's own completion plugin answers from the composed config once
the ``train`` word is taken out of COMP_LINE (Hydra expects ``<app> <overrides>``). Other commands complete
file names. Nothing here or on the query path imports torch.
"""

from __future__ import annotations

import os
import re

from marginlab.errors import ConfigError

FLAGS = ("--shell-completion", "-sc")
SHELLS = ("bash", "zsh")

# COMP_LINE is cut at the cursor; each word of it is split on spaces (Hydra's own query does the same). Bash breaks
# `head=arc` into `head` `=` `arc` (COMP_WORDBREAKS) and replaces only the last piece, so the replies are given
# relative to it; zsh's bashcompinit keeps the whole word, so there the piece is the word itself.
BASH_SCRIPT = r"""_marginlab_completion()
{
    [[ -n "${ZSH_VERSION-}" ]] && setopt localoptions ksharrays shwordsplit  # bash's 0-based arrays and splitting
    local line="${COMP_LINE:0:$COMP_POINT}"
    local -a words=($line)
    local word=""
    if [[ -n "$line" && "$line" != *" " ]]; then
        word="${words[${#words[@]}-1]}"
    fi
    local nwords=${#words[@]}
    [[ -z "$word" ]] && nwords=$((nwords + 1))
    local choices
    if (( nwords <= 2 )); then
        choices="%(commands)s"
    elif [[ "${words[1]}" == "train" ]]; then
        choices=$(COMP_LINE="$line" COMP_POINT=${#line} "${words[0]}" train -sc query=bash 2>/dev/null)
    else
        return 1  # -o default: file names
    fi
    local piece="${COMP_WORDS[COMP_CWORD]}"
    [[ "$word" == *"$piece" ]] || piece="$word"
    local prefix="${word:0:${#word}-${#piece}}"
    local -a matches=($(compgen -W "$choices" -- "$word"))
    COMPREPLY=("${matches[@]#"$prefix"}")
}
complete -o nospace -o default -F _marginlab_completion marginlab
"""

ZSH_PREAMBLE = "autoload -Uz compinit bashcompinit && compinit -i && bashcompinit  # zsh runs bash's completion\n"

UNINSTALL = "complete -r marginlab 2>/dev/null; unset -f _marginlab_completion\n"


def completion_request(args: list[str]) -> tuple[str, str] | None:
    """``(action, shell)`` of ``-sc install=bash`` / ``--shell-completion query=zsh`` in ``args``; None without."""
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag not in FLAGS:
            continue
        request = value if eq else (args[i + 1] if i + 1 < len(args) else "")
        action, _, shell = request.partition("=")
        if action not in ("install", "uninstall", "query") or shell not in SHELLS:
            raise ConfigError(
                f"shell completion: {request!r} is not one of install=<shell>, uninstall=<shell>, "
                f"query=<shell> with <shell> one of {', '.join(SHELLS)}"
            )
        return action, shell
    return None


def script(action: str, shell: str, commands: list[str]) -> str:
    """The text that ``eval`` installs (or uninstalls) in ``shell``."""
    if action == "uninstall":
        return UNINSTALL
    text = BASH_SCRIPT % {"commands": " ".join(commands)}
    return ZSH_PREAMBLE + text if shell == "zsh" else text


def drop_command_word() -> None:
    """COMP_LINE ``marginlab train head=arc`` -> ``marginlab head=arc`` (what Hydra's query parses)."""
    line = os.environ.get("COMP_LINE", "")
    os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+)\s+train(?=\s|$)", r"\1", line, count=1)
    os.environ["COMP_POINT"] = str(len(os.environ["COMP_LINE"]))
