"""benchmarks/lenet_2d_heads.py (issue 16): the step a 2-D user runs, each head against softmax, never rots."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ROW = re.compile(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\[([\d.]+)-([\d.]+)\]\s+([\d.]+)\s+(PASS|MISS) <= 1\.10$",
                 re.MULTILINE)


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
    """Stands in for a Step: each run takes the next of ``times`` (wall, cpu) seconds."""

    def __init__(self, times):
        self.times, self.wall, self.cpu = list(times), [], []

    def run(self, images, labels):
        return self.times.pop(0)


def test_each_head_is_divided_by_the_mean_of_the_softmax_steps_either_side():
    bench = load("lenet_2d_heads")
    reference = _FixedStep([(1.0, 1.0), (3.0, 2.0), (5.0, 2.0)])  # S h S h S: brackets (1, 3) then (3, 5)
    order = ["a", "b"]
    bench.random.Random(0).shuffle(order)  # the order race visits the heads in
    heads = {order[0]: _FixedStep([(4.0, 3.0)]), order[1]: _FixedStep([(4.0, 3.0)])}
    ratios = bench.race(heads, reference, None, None, rounds=1, seed=0)
    assert ratios[order[0]] == [(2.0, 2.0)]  # 4 / mean(1, 3); cpu 3 / mean(1, 2)
    assert ratios[order[1]] == [(1.0, 1.5)]  # 4 / mean(3, 5); cpu 3 / mean(2, 2)
    assert reference.wall == [3.0, 5.0]  # the softmax step after each head


def test_heads_benchmark_no_longer_times_the_2d_per_op_shape():
    assert (256, 2, 10) not in load("heads").SHAPES.values()
    assert not (BENCHMARKS / "small_shape_bound.py").exists()
