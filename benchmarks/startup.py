"""Start-up time (issue #16): the commands that only print, and `marginlab train` up to its first step (not a test).

Help: each round runs, in a fresh interpreter each, `python -c "import hydra, omegaconf"` (the baseline),
`marginlab --help`, `marginlab train --help`, `marginlab train --help seed=0` (an override: Hydra renders the
page, as every `--help` did before marginlab/commands/help_page.py) and `python -c "import torch, torchvision"` (what
every command paid before marginlab/commands/train.py). Target: `marginlab --help` and `marginlab train --help`
within 1.5x the baseline.

First step: each round runs `python -c "import torch, torchvision"`, the default data set's own load (a
process that imports torch, torchvision and the data set's class first, then times building it, ``setup()``
and its loaders, and prints that time) and `marginlab train` with the default config, stopped at the end of
its first optimizer step (a global ``torch.optim`` step hook this script installs in the child: ``os._exit``;
nothing in marginlab knows about it). Target: the first step within 1.3x (import torch, torchvision + the
data set's load), both measured in the same round.

The rounds alternate the commands' order so that machine noise hits all of them. Printed: each command's median
wall time and min-max, and its ratio to the baseline (median over rounds of the per-round ratio, with min-max).

    python benchmarks/startup.py [--repeats 5] [--only help|first-step]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: `marginlab train` until its first optimizer step has run, then out (no run summary, no flush)
FIRST_STEP = """
import os, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *args: os._exit(0))
from marginlab.commands.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""

#: the default data set's own load, after torch, torchvision and its class are imported: prints seconds
DATA_LOAD = """
import importlib, time
import torch, torchvision  # noqa: F401
import yaml
from omegaconf import OmegaConf
from hydra.utils import instantiate
import marginlab.config  # noqa: F401  (resolvers)
from marginlab.help_catalog import CONFIGS
primary = yaml.safe_load((CONFIGS / "train.yaml").read_text())
option = next(e["dataset"] for e in primary["defaults"] if isinstance(e, dict) and "dataset" in e)
node = yaml.safe_load((CONFIGS / "dataset" / f"{option}.yaml").read_text())
importlib.import_module(node["_target_"].rpartition(".")[0])
cfg = OmegaConf.create({"seed": 0, "dataset": node})
start = time.perf_counter()
data = instantiate(cfg.dataset)
data.setup()
data.loaders(torch.device("cpu"))
print(time.perf_counter() - start)
"""


def marginlab_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m marginlab`."""
    script = Path(sys.executable).with_name("marginlab")
    if script.exists():
        return [str(script)]
    found = shutil.which("marginlab")
    return [found] if found else [sys.executable, "-m", "marginlab"]


def help_commands() -> dict[str, list[str]]:
    marginlab = marginlab_command()
    return {
        "import hydra, omegaconf": [sys.executable, "-c", "import hydra, omegaconf"],
        "marginlab --help": [*marginlab, "--help"],
        "marginlab train --help": [*marginlab, "train", "--help"],
        # any override sends the page to Hydra, which lists the groups itself: the cost before commands/help_page.py
        "train --help seed=0 (Hydra's)": [*marginlab, "train", "--help", "seed=0"],
        "import torch, torchvision": [sys.executable, "-c", "import torch, torchvision"],
    }


def first_step_commands() -> dict[str, list[str]]:
    return {
        "import torch, torchvision": [sys.executable, "-c", "import torch, torchvision"],
        "data set load (in-process)": [sys.executable, "-c", DATA_LOAD],
        "marginlab train, 1st step": [sys.executable, "-c", FIRST_STEP],
    }


def timed(argv: list[str], cwd: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one process; the run directories land under ``cwd``."""
    env = {**os.environ, "MARGINLAB_OUTPUT_DIR": cwd}
    start = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=cwd, env=env, check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    return time.perf_counter() - start, proc.stdout


def rounds(cmds: dict[str, list[str]], repeats: int, cwd: str) -> dict[str, list[tuple[float, str]]]:
    names = list(cmds)
    out: dict[str, list[tuple[float, str]]] = {name: [] for name in names}
    for name in names:  # warm the file cache once, untimed
        timed(cmds[name], cwd)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            out[name].append(timed(cmds[name], cwd))
    return out


def row(name: str, times: list[float], base: list[float]) -> str:
    ratios = [a / b for a, b in zip(times, base)]
    return (
        f"{name:34s} {statistics.median(times):9.3f} {min(times):6.3f}-{max(times):6.3f} "
        f"{statistics.median(ratios):6.2f}x {min(ratios):6.2f}-{max(ratios):5.2f}x"
    )


HEADER = f"{'command':34s} {'median s':>9s} {'min-max s':>13s} {'ratio':>7s} {'ratio min-max':>14s}"


def help_section(repeats: int, cwd: str) -> None:
    results = rounds(help_commands(), repeats, cwd)
    times = {name: [t for t, _ in runs] for name, runs in results.items()}
    base = times["import hydra, omegaconf"]
    print(f"\nhelp, {repeats} rounds; ratio to `import hydra, omegaconf` (target <= 1.5x)")
    print(HEADER)
    for name, t in times.items():
        print(row(name, t, base))


def first_step_section(repeats: int, cwd: str) -> None:
    results = rounds(first_step_commands(), repeats, cwd)
    imports = [t for t, _ in results["import torch, torchvision"]]
    load = [float(out.strip().splitlines()[-1]) for _, out in results["data set load (in-process)"]]
    first = [t for t, _ in results["marginlab train, 1st step"]]
    base = [a + b for a, b in zip(imports, load)]
    print(
        f"\nfirst optimizer step, {repeats} rounds; ratio to `import torch, torchvision` + the data set's load "
        "(target <= 1.3x)"
    )
    print(HEADER)
    print(row("import torch, torchvision", imports, base))
    print(row("data set load (digits, in-process)", load, base))
    print(row("baseline: imports + data load", base, base))
    print(row("marginlab train, 1st step", first, base))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each command once per round)")
    parser.add_argument("--only", choices=("help", "first-step"), help="one of the two sections")
    args = parser.parse_args()
    print(f"start-up, {os.cpu_count()} CPUs, {sys.executable}")
    with tempfile.TemporaryDirectory() as cwd:  # nothing a command writes lands in the repo
        if args.only in (None, "help"):
            help_section(args.repeats, cwd)
        if args.only in (None, "first-step"):
            first_step_section(args.repeats, cwd)


if __name__ == "__main__":
    main()
