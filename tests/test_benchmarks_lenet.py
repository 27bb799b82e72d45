"""benchmarks/lenet_2d_heads.py (issue 16): the step a 2-D user runs, each head against softmax, never rots."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW = re.compile(
    r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\[([\d.]+)-([\d.]+)\]\s+([\d.]+)\s+(PASS|MISS) <= 1\.10$", re.MULTILINE
)


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_a_ratio_with_spread_and_verdict_per_head(capsys):
    assert load("lenet_2d_heads").main(["--quick", "--batch-size", "4", "--heads", "softmax,arcface"]) == 0
    out = capsys.readouterr().out
    rows = ROW.findall(out)
    assert [r[0] for r in rows] == ["softmax", "arcface"]
    for _, step_ms, softmax_ms, ratio, low, high, _, verdict in rows:
        assert float(step_ms) > 0 and float(softmax_ms) > 0
        assert float(low) <= float(ratio) <= float(high)
        assert verdict == ("PASS" if float(ratio) <= 1.10 else "MISS")
    assert re.search(r"^target <= 1\.10x the softmax step missed by: ", out, re.MULTILINE)


def test_every_shipped_head_builds_and_trains_a_2d_step():
    bench = load("lenet_2d_heads")
    names = sorted(p.stem for p in bench.HEAD_CONFIGS.glob("*.yaml"))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 1, 28, 28, generator=g), torch.tensor([0, 3, 9, 3])
    steps, skipped = bench.prepare(names, images, labels, torch.device("cpu"))
    assert skipped == {}
    assert set(steps) == set(names) and all(s.finite for s in steps.values())
    step = steps["arcface"]
    assert step.model.backbone.embedding_dim == 2 and type(step.model.backbone).__name__ == "LeNetPP"
    assert type(step.criterion).__name__ == "MarginLoss" and isinstance(step.optimizer, torch.optim.SGD)


class _FixedStep:
    """Stands in for a Step: each run takes the next of ``times`` (wall, cpu) seconds and is logged in ``log``."""

    def __init__(self, name, times, log):
        self.name, self.times, self.log, self.wall, self.cpu = name, list(times), log, [], []

    def run(self, images, labels):
        self.log.append(self.name)
        return self.times.pop(0)


def test_each_head_is_divided_by_its_softmax_twin_run_next_to_it_once_a_round():
    bench = load("lenet_2d_heads")
    log = []
    heads = {"a": _FixedStep("a", [(3.0, 1.5), (4.0, 4.0)], log), "b": _FixedStep("b", [(2.0, 1.0), (6.0, 1.0)], log)}
    twins = {
        "a": _FixedStep("twin a", [(2.0, 1.0), (4.0, 2.0)], log),
        "b": _FixedStep("twin b", [(2.0, 1.0), (4.0, 2.0)], log),
    }
    ratios = bench.race(heads, twins, None, None, rounds=2, seed=0)
    assert ratios == {"a": [(1.5, 1.5), (1.0, 2.0)], "b": [(1.0, 1.0), (1.5, 0.5)]}
    assert heads["a"].wall == [3.0, 4.0] and twins["b"].cpu == [1.0, 2.0]
    first, second = log[:4], log[4:]  # round 0: twin then head; round 1: head then twin; each model once a round
    assert sorted(first) == sorted(second) == ["a", "b", "twin a", "twin b"]
    assert all(first[i].startswith("twin") and second[i + 1].startswith("twin") for i in (0, 2))
    assert {first[i + 1] for i in (0, 2)} == {"a", "b"} and all(f"twin {first[i + 1]}" == first[i] for i in (0, 2))


def test_heads_benchmark_no_longer_times_the_2d_per_op_shape():
    assert (256, 2, 10) not in load("heads").SHAPES.values()
    assert not (BENCHMARKS / "small_shape_bound.py").exists()
