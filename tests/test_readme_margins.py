"""Every ``marginlab train`` line of the README and of the docs pages (docs/*.md) composes (as
``marginlab train --cfg job`` would: ``compose_train_config``, no data needed) and gets an "ok" from the margin
advisor (marginlab/training/margin_feasibility.py), or says on its own line why not (``# advisor: <verdict> ...``):
the docs must not teach a run that the tool itself calls infeasible (AM-Softmax's default m=0.35 with a 2-D
embedding)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from marginlab.config.validate import validate
from marginlab.training.builders import build_head
from marginlab.training.margin_feasibility import advise
from marginlab.training.resume import compose_train_config

ROOT = Path(__file__).resolve().parents[1]
#: the README and every docs page
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: the class count of each dataset config whose classes come from the data (dataset.num_classes: null)
CLASSES = {"digits": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "casia": 10572}
CLASSES |= {"cub200": 100, "cars196": 98, "sop": 11318, "inshop": 3997}  # their training classes
CLASSES["digitsretrieval"] = 5  # DigitsRetrievalData: digits 0-4 train (dataset.train_classes)


def train_lines(page: Path) -> list[tuple[str, str, str]]:
    """(page:line, the command's overrides, its comment) of each ``marginlab train`` command in the code blocks
    of ``page``, continuation lines joined."""
    out, in_code, pending = [], False, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not in_code:
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        elif re.search(r"(^|-m )marginlab train\b", line.strip()):
            pending = (f"{page.relative_to(ROOT)}:{number}", line.strip())
        if pending is not None and not pending[1].endswith("\\"):
            command, _, comment = pending[1].partition("#")
            out.append((pending[0], command.replace("\\", " ").split("marginlab train", 1)[1], comment))
            pending = None
    return out


def jobs(command: str) -> list[list[str]]:
    """The jobs a command line runs: each comma-separated multirun value (``-m``) expanded, placeholders
    (``<run dir>``, ``...``) and run management (``resume``, ``init_from``) left out."""
    args = [
        a
        for a in shlex.split(command)
        if "<" not in a and ">" not in a and a != "..." and not a.startswith(("resume", "init"))
    ]
    multirun = "-m" in args
    choices = []
    for arg in (a for a in args if a != "-m"):
        key, _, value = arg.partition("=")
        split = multirun and "," in value and not value.startswith("[")
        choices.append([f"{key}={v}" for v in value.split(",")] if split else [arg])
    return [list(job) for job in itertools.product(*choices)]


def verdict(overrides: list[str]) -> str:
    cfg = compose_train_config(overrides)
    spec = validate(cfg)
    classes = cfg.dataset.get("num_classes") or CLASSES[cfg.dataset._target_.rsplit(".", 1)[-1].lower()[:-4]]
    head = build_head(spec, int(cfg.backbone.embedding_dim), int(classes))
    advice = advise(head)
    return "ok" if advice is None else advice.verdict


LINES = [line for page in PAGES for line in train_lines(page)]


def test_the_readme_and_the_docs_have_train_lines():
    assert len(LINES) >= 10 and any("-m" in command for _, command, _ in LINES)
    assert any(where.startswith("README.md:") for where, _, _ in LINES)
    assert {"docs/getting-started.md", "docs/faces.md", "docs/sweeps.md"} <= {w.split(":")[0] for w, _, _ in LINES}


@pytest.mark.parametrize("where, command, comment", LINES, ids=[where for where, _, _ in LINES])
def test_every_train_line_composes_and_is_feasible_or_says_why(where, command, comment):
    said = re.search(r"advisor: (\w+)", comment)
    for job in jobs(command):
        got = verdict(job)
        expected = said.group(1) if said else "ok"
        assert got == expected, f"{where}: {' '.join(job)} -> {got} (the line says {expected})"
