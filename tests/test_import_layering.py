"""The package imports only downward (issue #17): config/ knows neither the builder nor the loop; no module
outside marginlab/heads/ and the builder imports a concrete head; the bottom modules (errors, checks, dtypes,
device...) import nothing of marginlab above them; nothing outside marginlab/commands/ imports the CLI;
backbones, data and regularizers never load the heads; no private name crosses a package boundary; training/ (one
run) sits above the model packages, which never import it, and only commands/ imports its entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

import marginlab

PACKAGE = Path(marginlab.__file__).parent
#: what config/ sits below: it must import none of them, not even inside a function
ABOVE_CONFIG = ("marginlab.training", "marginlab.commands")


def imported_modules(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in ``path``, function-level ones included; name None for ``import m``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def test_importing_config_loads_neither_torch_nor_the_builder():
    code = (
        "import sys, marginlab.config, marginlab.config.schema, marginlab.config.validate; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m in {ABOVE_CONFIG!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_config_imports_nothing_above_it():
    offenders = []
    for path in sorted((PACKAGE / "config").rglob("*.py")):
        for module, name in imported_modules(path):  # `from marginlab import builders` names it as `name`
            named = {module, f"{module}.{name}"} if name else {module}
            if any(n == above or n.startswith(f"{above}.") for n in named for above in ABOVE_CONFIG):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {max(named, key=len)}")
    assert not offenders, offenders


def concrete_heads() -> tuple[set[str], set[str]]:
    """(the modules, the class names) of every head a configs/head/*.yaml names."""
    targets = {yaml.safe_load(p.read_text())["_target_"] for p in (PACKAGE / "configs" / "head").glob("*.yaml")}
    return {t.rpartition(".")[0] for t in targets}, {t.rpartition(".")[2] for t in targets}


def test_no_module_outside_heads_and_the_builder_imports_a_concrete_head():
    modules, classes = concrete_heads()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("heads/") or rel == "training/builders.py":
            continue
        for module, name in imported_modules(path):
            named = f"{module}.{name}" if name else module
            if module in modules or named in modules or (module == "marginlab.heads" and name in classes):
                offenders.append((rel, named))
    assert not offenders, offenders


def marginlab_imports(path: Path) -> set[str]:
    """The marginlab modules ``path`` imports (``from marginlab import x`` counts as ``marginlab.x``)."""
    found = set()
    for module, name in imported_modules(path):
        if module == "marginlab" and name:
            found.add(f"marginlab.{name}")
        elif module.split(".")[0] == "marginlab":
            found.add(module)
    return found


#: the bottom layer: each imports at most the others of this set, nothing else of marginlab
BOTTOM = ("errors", "checks", "dtypes", "device", "command_args", "files", "file_lock", "run_dirs")


def test_the_bottom_modules_import_no_other_marginlab_module():
    bottom = {f"marginlab.{name}" for name in BOTTOM}
    offenders = {
        f"{name}.py imports {sorted(marginlab_imports(PACKAGE / f'{name}.py') - bottom)}"
        for name in BOTTOM
        if marginlab_imports(PACKAGE / f"{name}.py") - bottom
    }
    assert not offenders, offenders


def test_nothing_outside_commands_imports_the_commands():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in ("commands", "__main__.py"):
            continue
        commands = {
            m for m in marginlab_imports(path) if m == "marginlab.commands" or m.startswith("marginlab.commands.")
        }
        offenders += [f"{path.relative_to(PACKAGE)} imports {m}" for m in sorted(commands)]
    assert not offenders, offenders


def test_every_subcommand_runs_a_main_in_commands():
    from marginlab.commands.cli import COMMANDS

    dispatched = marginlab_imports(PACKAGE / "commands" / "cli.py")
    missing = [name for name in COMMANDS if name != "version" and f"marginlab.commands.{name}" not in dispatched]
    assert not missing, missing


def test_backbones_data_and_regularizers_never_load_the_heads():
    offenders = []
    for package in ("backbones", "data", "regularizers"):
        for path in sorted((PACKAGE / package).rglob("*.py")):
            heads = {m for m in marginlab_imports(path) if m == "marginlab.heads" or m.startswith("marginlab.heads.")}
            offenders += [f"{path.relative_to(PACKAGE)} imports {m}" for m in sorted(heads)]
    assert not offenders, offenders


def test_no_module_imports_a_private_name_from_another_package():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        own = ".".join(("marginlab", *parts[:-1])) if len(parts) > 1 else ".".join(("marginlab", *parts))
        for module, name in imported_modules(path):
            private = name and name.startswith("_") and not name.startswith("__")
            if module.split(".")[0] == "marginlab" and private and not (module == own or module.startswith(f"{own}.")):
                offenders.append(f"{path.relative_to(PACKAGE)}: from {module} import {name}")
    assert not offenders, offenders


def test_the_data_package_imports_in_no_circle():
    """data/base.py reaches data/in_memory.py downward only (their shared error lives in data/batch_count.py)."""
    data = PACKAGE / "data"
    names = {f"marginlab.data.{p.stem}" for p in data.glob("*.py") if p.stem != "__init__"}
    graph = {
        f"marginlab.data.{p.stem}": {m for m, _ in imported_modules(p) if m in names}
        for p in data.glob("*.py")
        if p.stem != "__init__"
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, circles


#: the packages training/ sits above (config/: test_config_imports_nothing_above_it; the bottom modules: BOTTOM)
BELOW_TRAINING = (
    "heads",
    "losses",
    "backbones",
    "data",
    "regularizers",
    "distributed",
    "geometry",
    "logging",
    "figures",
)
#: the one reach up, inside a function: torchvision's ImageNet file is read by the weights-only checkpoint reader
#: that every untrusted file goes through
READS_UP = {("backbones/torchvision_resnet.py", "marginlab.training.checkpoint")}


def test_the_packages_below_training_never_import_it():
    offenders = []
    for package in BELOW_TRAINING:
        for path in sorted((PACKAGE / package).rglob("*.py")):
            rel = path.relative_to(PACKAGE).as_posix()
            training = {
                m for m in marginlab_imports(path) if m == "marginlab.training" or m.startswith("marginlab.training.")
            }
            offenders += [f"{rel} imports {m}" for m in sorted(training) if (rel, m) not in READS_UP]
    assert not offenders, offenders


def test_only_the_commands_start_a_training_run():
    """training/train.py (the run's recipe) is the entry point: nothing in the library but commands/ imports it."""
    offenders = [
        path.relative_to(PACKAGE).as_posix()
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "commands" and "marginlab.training.train" in marginlab_imports(path)
    ]
    assert not offenders, offenders
