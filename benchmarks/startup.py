"""Start-up time of the commands that only print (issue #16), against `import hydra, omegaconf` (not a test).

Each round runs, in a fresh interpreter each, `python -c "import hydra, omegaconf"` (the baseline),
`marginlab --help`, `marginlab train --help` and `python -c "import torch, torchvision"` (what every
command paid before); the rounds alternate the commands so that machine noise hits all of them. Printed:
each command's median wall time, min-max, and its ratio to the baseline (median over rounds of the
per-round ratio, with its min-max). Target: `marginlab --help` and `marginlab train --help` within 1.5x.

    python benchmarks/startup.py [--repeats 5]
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


def marginlab_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m marginlab`."""
    script = Path(sys.executable).with_name("marginlab")
    if script.exists():
        return [str(script)]
    found = shutil.which("marginlab")
    return [found] if found else [sys.executable, "-m", "marginlab"]


def commands() -> dict[str, list[str]]:
    marginlab = marginlab_command()
    return {
        "import hydra, omegaconf": [sys.executable, "-c", "import hydra, omegaconf"],
        "marginlab --help": [*marginlab, "--help"],
        "marginlab train --help": [*marginlab, "train", "--help"],
        "import torch, torchvision": [sys.executable, "-c", "import torch, torchvision"],
    }


def timed(argv: list[str], cwd: str) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each command once per round)")
    args = parser.parse_args()
    cmds = commands()
    names = list(cmds)
    times: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as cwd:  # nothing a command might write lands in the repo
        for name in names:  # warm the file cache once, untimed
            timed(cmds[name], cwd)
        for r in range(args.repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                times[name].append(timed(cmds[name], cwd))
    base = times[names[0]]
    print(f"start-up, {args.repeats} rounds, {os.cpu_count()} CPUs, {sys.executable}")
    print(f"{'command':28s} {'median s':>9s} {'min-max s':>13s} {'ratio':>7s} {'ratio min-max':>14s}")
    for name in names:
        t = times[name]
        ratios = [a / b for a, b in zip(t, base)]
        print(f"{name:28s} {statistics.median(t):9.3f} {min(t):6.3f}-{max(t):6.3f} "
              f"{statistics.median(ratios):6.2f}x {min(ratios):6.2f}-{max(ratios):5.2f}x")


if __name__ == "__main__":
    main()
