"""The first run a user sees (issue #16): `marginlab train` against the default it replaced, side by side (not a test).

``old`` is the default of 2026-12-02 reproduced through overrides (OLD_DEFAULT below: DigitsCNN width 32,
batch 64 through a DataLoader, 30 epochs); ``new`` is `marginlab train` with nothing but ``seed=``. Each is one
whole process (`python -m marginlab train`, start-up included), timed from outside. For every seed the two
run back to back, the one that goes first alternating, so machine noise hits both; both use the code of
this checkout, so speed-ups in the code (not the configuration) help both and are not counted in the ratio.
Printed: per run the final test/acc, best/test/acc (the epoch best.pt chose on val/acc) and wall seconds; per
configuration the mean accuracies over the seeds; the wall ratio new/old per seed as median and min-max, and
the same for CPU time (user + system of the process and its threads), which other jobs on a shared machine
disturb less than wall time.
Targets: mean test/acc of ``new`` >= 0.99 and ratio <= 0.5.

    python benchmarks/first_run.py [--seeds 0 1 2] [--rounds 1] [--new "backbone.width=8 ..."]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from marginlab.environment import cpu_name

#: the default of 2026-12-02 (issue #16), every value that the new default changes spelled out
OLD_DEFAULT = [
    "backbone=digits_cnn",
    "backbone.width=32",
    "backbone.embedding_dim=64",
    "head=amsoftmax",
    "dataset=digits",
    "dataset.batch_size=64",
    "dataset.in_memory=false",
    "optim=sgd",
    "optim.lr=0.1",
    "sched=cosine",
    "trainer.epochs=30",
]


def run_once(overrides: list[str], seed: int, root: Path) -> dict:
    """One `marginlab train` process writing under a fresh ``root``: its wall time and metrics.json."""
    env = {**os.environ, "MARGINLAB_OUTPUT_DIR": str(root)}
    argv = [sys.executable, "-m", "marginlab", "train", *overrides, f"seed={seed}"]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(
        argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # user + system, all threads
    if proc.returncode != 0:
        raise SystemExit(f"first_run: {shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    (summary,) = [json.loads(p.read_text()) for p in root.glob("runs/*/metrics.json")]
    return {
        "seed": seed,
        "wall_s": wall,
        "cpu_s": cpu,
        "test_acc": summary["test/acc"],
        "best_test_acc": summary["best/test/acc"],
        "epochs": summary["epochs_done"],
    }


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=1, help="times each (configuration, seed) runs")
    parser.add_argument("--new", default="", help="extra overrides of the new configuration (for exploring)")
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    configs = {"old": OLD_DEFAULT, "new": shlex.split(args.new)}
    print(
        f"first run: {os.cpu_count()} CPUs ({cpu_name()}), load average {os.getloadavg()[0]:.2f} at start, "
        f"{sys.executable}"
    )
    print(f"old: marginlab train {' '.join(configs['old'])}\nnew: marginlab train {' '.join(configs['new'])}")
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        i = 0
        for _ in range(args.rounds):
            for seed in args.seeds:
                for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                    root = Path(tmp) / f"{name}-{i}"
                    root.mkdir()
                    result = run_once(configs[name], seed, root)
                    runs[name].append(result)
                    print(
                        f"  {name} seed {seed}: test/acc {result['test_acc']:.4f}  best/test/acc "
                        f"{result['best_test_acc']:.4f}  wall {result['wall_s']:6.2f} s  cpu {result['cpu_s']:6.2f} s",
                        flush=True,
                    )
                i += 1
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    for name, rs in runs.items():
        print(
            f"{name}: mean test/acc {statistics.mean(r['test_acc'] for r in rs):.4f}, mean best/test/acc "
            f"{statistics.mean(r['best_test_acc'] for r in rs):.4f} over {len(rs)} runs; wall s "
            f"{spread([r['wall_s'] for r in rs], '{:.2f}')}; cpu s {spread([r['cpu_s'] for r in rs], '{:.2f}')}"
        )
    ratios = [n["wall_s"] / o["wall_s"] for o, n in zip(runs["old"], runs["new"])]
    mean_new = statistics.mean(r["test_acc"] for r in runs["new"])
    print(f"wall ratio new/old (per seed): {spread(ratios)}")
    print(
        f"cpu ratio new/old (per seed): {spread([n['cpu_s'] / o['cpu_s'] for o, n in zip(runs['old'], runs['new'])])}"
        " (less sensitive than wall to other jobs on the machine)"
    )
    print(
        f"targets: mean test/acc {mean_new:.4f} >= 0.99: {'met' if mean_new >= 0.99 else 'MISSED'}; "
        f"median ratio {statistics.median(ratios):.3f} <= 0.5: "
        f"{'met' if statistics.median(ratios) <= 0.5 else 'MISSED'}"
    )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "ratios": ratios, "configs": configs}, indent=1))


if __name__ == "__main__":
    main()
