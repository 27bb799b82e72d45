"""mkdocs hook: the configuration reference and the head and dataset tables, generated from the code at build time.

``<!-- config-reference -->`` in a page becomes the fields of ``TrainConfig`` (marginlab/config/schema.py: type,
default, the comment written beside it) and the options of every config group (``marginlab/configs/<group>/``,
one line each from ``marginlab.help_catalog``, the lines ``marginlab train --help`` prints); ``<!-- head-table -->``
becomes one row per ``configs/head/*.yaml`` with its paper and defaults; ``<!-- dataset-table -->`` one row per
``configs/dataset/*.yaml`` with what it picks (its defaults list and trainer.epochs) and why (its comment);
``<!-- resumable-keys -->`` the keys a resume may change (``RESUMABLE`` in marginlab/training/resume.py).
Nothing here is written by hand, so the pages cannot drift from the configs.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `mkdocs build` from a checkout: import marginlab without installing it
    sys.path.insert(0, str(ROOT))

from marginlab.help_catalog import (  # noqa: E402
    CONFIGS,
    catalog,
    dataset_picks,
    leading_comment,
    option_configs,
    scalar,
    train_defaults,
)

SCHEMA = ROOT / "marginlab" / "config" / "schema.py"
RESUME = ROOT / "marginlab" / "training" / "resume.py"
SECTIONS = {"TrainConfig": "", "TrainerConfig": "trainer.", "LoggerConfig": "logger."}


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").strip()


def prose(text: str) -> str:
    """A table cell of prose: ``<run dir>`` shown, not taken for an HTML tag."""
    return cell(text).replace("<", "&lt;")


def choice_values(kind: str, default: str) -> tuple[str, str]:
    """An enum field (``Precision``, schema.py's ``Choice``): its values as the type, its plain default."""
    from marginlab.config import schema

    enum = getattr(schema, kind, None)
    if not (isinstance(enum, type) and issubclass(enum, schema.Choice)):
        return kind, default
    return " | ".join(e.value for e in enum), f'"{enum[default.rpartition(".")[2]]}"'


def field_rows(source: str, tree: ast.Module, cls: str) -> list[tuple[str, str, str, str]]:
    """``[(name, type, default, comment)]`` of the annotated fields of dataclass ``cls`` in schema.py; the
    comment is the one on the field's line, else the comment lines right above it."""
    lines = source.splitlines()
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    rows = []
    for stmt in node.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        default = ast.get_source_segment(source, stmt.value) if stmt.value is not None else ""
        if default.startswith("field(default_factory="):
            default = "(" + default.removeprefix("field(default_factory=").rstrip(")") + ")"
        line = lines[stmt.lineno - 1]
        comment = line.split("#", 1)[1].strip() if "#" in line else ""
        above, number = [], stmt.lineno - 2
        while not comment and number >= 0 and lines[number].strip().startswith("#"):
            above.insert(0, lines[number].strip().lstrip("#").strip())
            number -= 1
        kind = ast.get_source_segment(source, stmt.annotation)
        kind, default = choice_values(kind, default)
        rows.append((stmt.target.id, kind, default, comment or " ".join(above)))
    return rows


def schema_reference() -> str:
    source = SCHEMA.read_text(encoding="utf-8")
    tree = ast.parse(source)
    out = [
        "Generated from `marginlab/config/schema.py` and `marginlab/configs/` when the site is built.",
        "`marginlab train --cfg job` prints the values a command line composes to.",
    ]
    for cls, prefix in SECTIONS.items():
        out += ["", f"### `{prefix or 'top level'}` ({cls})", ""]
        out += ["| key | type | default | what |", "|---|---|---|---|"]
        for name, kind, default, comment in field_rows(source, tree, cls):
            out.append(f"| `{prefix}{name}` | `{cell(kind)}` | `{cell(default)}` | {prose(comment)} |")
    return "\n".join(out)


def summary(line: str) -> str:
    """A group option's line without Hydra's ``@package`` directive and cut after its first sentence (an
    "et al." followed by a venue or a year is no sentence end)."""
    line = re.sub(r"^@package \S+\s*", "", line)
    return re.split(r"\.\s+(?=[a-z]|Training |Change |10-fold )", line, maxsplit=1)[0]


def groups_reference() -> str:
    defaults = train_defaults()
    out = ["", "### Config groups", "", "`<group>=<option>` on the command line; the default is in bold."]
    for group in sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name != "hydra"):
        rows = dict(catalog(group))  # options naming a _target_: their paper / class line
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            rows.setdefault(path.stem, leading_comment(path))
        default = defaults.get(group)
        out += ["", f"#### `{group}` (default: `{default}`)", "", "| option | what |", "|---|---|"]
        for option, line in rows.items():
            name = f"**`{option}`**" if option == default else f"`{option}`"
            out.append(f"| {name} | {prose(summary(line))} |")
    return "\n".join(out)


def head_table() -> str:
    papers = dict(catalog("head"))
    out = ["| `head=` | paper | class | defaults |", "|---|---|---|---|"]
    for option, cfg in option_configs("head").items():
        values = ", ".join(
            f"{k}={scalar(v)}" for k, v in cfg.items() if k not in ("_target_", "init", "chunked", "partial_fc")
        )
        target = cfg["_target_"].rpartition(".")[2]
        out.append(f"| `{option}` | {prose(papers.get(option, ''))} | `{target}` | {cell(values) or '-'} |")
    return "\n".join(out)


def picks_comment(path: Path) -> str:
    """The "Its picks: ..." sentences of a dataset config's opening comment: why it picks what it picks."""
    lines = [
        line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")
    ]
    text = " ".join(lines)
    return text.partition("Its picks: ")[2].partition(" An explicit ")[0]


def dataset_table() -> str:
    out = [
        "| `dataset=` | what | `backbone=` | `optim=` | `sched=` | `trainer.epochs=` | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted((CONFIGS / "dataset").glob("*.yaml")):
        picks = dataset_picks(path.stem)
        why = picks_comment(path) or "`marginlab train`'s own defaults (train.yaml)"
        cells = " | ".join(f"`{picks[k]}`" for k in ("backbone", "optim", "sched", "trainer.epochs"))
        out.append(f"| `{path.stem}` | {prose(leading_comment(path))} | {cells} | {prose(why)} |")
    return "\n".join(out)


def resumable_keys() -> str:
    """``RESUMABLE`` read from resume.py's source (no torch import at build time): `key`, `prefix.*`, ..."""
    tree = ast.parse(RESUME.read_text())
    node = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "RESUMABLE")
    return ", ".join(f"`{k}*`" if k.endswith(".") else f"`{k}`" for k in ast.literal_eval(node))


def on_page_markdown(markdown: str, **kwargs) -> str:
    if "<!-- config-reference -->" in markdown:
        markdown = markdown.replace("<!-- config-reference -->", schema_reference() + "\n" + groups_reference())
    if "<!-- dataset-table -->" in markdown:
        markdown = markdown.replace("<!-- dataset-table -->", dataset_table())
    if "<!-- resumable-keys -->" in markdown:
        markdown = markdown.replace("<!-- resumable-keys -->", resumable_keys())
    if "<!-- head-table -->" in markdown:
        markdown = markdown.replace("<!-- head-table -->", head_table())
    return markdown
