"""Cost of every margin head against two floors: forward + backward time and peak memory.

For each head (every ``marginlab/configs/head/*.yaml``, built as the builder does) and each shape
(B, D, C) it times one training step of the head alone: ``logits = head(x, labels)``,
``F.cross_entropy(logits, labels)`` (plus ``head.extra_loss()`` where a head has one, as the engine
adds it), ``backward()`` to x and to every head parameter. It is the step the trainer runs on the steps that
log no geometry (9 in 10 at the default ``logger.log_every_n_steps=10``); ``--probe`` times the logging steps
instead, which also take the head's pure ``cosine`` of the batch (the criterion's step statistics). The same step
is timed for

* floor 1 -- ``F.linear(x, W) + CE``: a plain linear classifier;
* floor 2 -- ``F.linear(F.normalize(x), F.normalize(W)) * s + CE``: the plain normalised-cosine
  formulation that normalised heads are usually written with;

with the same x, labels and weights (copies of the head's). Head, floor 1 and floor 2 are run in
turn (the order rotating every repeat), so load on the machine hits all three alike; each time is
the median over the repeats, after one warm-up step of each. Ratios are head / floor from the same run.

Peak memory: one extra step of each is run under ``torch.profiler`` with ``profile_memory=True``;
its allocation and free events (every CPU allocator call, with its size and time) are replayed in
time order and the peak of the running sum is reported: the most memory the step held at once
beyond what existed before it (activations, saved tensors, temporaries and the new ``.grad``
tensors -- gradients are reset to None before the step, so every contender allocates its own).
Every contender keeps its logits until after ``backward()``, as the training engine does (it reads
them afterwards for the accuracy), so a head whose probe cosines are an alias of its logits is not
charged for them, and a floor is not credited for freeing its logits early.

Targets (issue 3, tightened by issue 16): unnormalised heads (softmax, lsoftmax, l2softmax) within 1.10x of
floor 1; normalised heads (normface, cosine, coco, amsoftmax, cosface, arcface, sphereface, combined,
curricularface, adaface, magface) within 1.10x of floor 2, issue 24's heads (NEW_HEADS) within 1.15x of it;
rbf within 1.20x of floor 1; peak memory within 1.2x of the same floor. subcenter_arcface multiplies the class
weights by k (a k x wider matmul), so it is listed without a target. The 2-D shape (256, 2, 10) is not timed
here: a head alone is per-op dispatch there, which no user sees; benchmarks/lenet_2d_heads.py times the step a
2-D user runs (LeNet++ + head against LeNet++ + softmax, issue 16). softtriple multiplies the class weights by K
(a K x wider matmul) and the proxy losses proxy_nca and proxy_anchor are no margin heads: listed without a target.

Usage: ``python benchmarks/heads.py [--heads a,b] [--shapes medium,large] [--repeats N] [--threads N]``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from marginlab.config.validate import resolve_head  # noqa: E402
from marginlab.heads.output import HeadLoss  # noqa: E402
from marginlab.training import builders  # noqa: E402

CONFIGS = ROOT / "marginlab" / "configs" / "head"
SHAPES = {"medium": (256, 512, 10575), "large": (128, 512, 85742)}
DEFAULT_REPEATS = {"medium": 15, "large": 5}  # medians steady to a few % on a noisy 2-core VM

UNNORMALISED = {"softmax", "lsoftmax", "l2softmax"}
NORMALISED = {
    "normface",
    "cosine",
    "coco",
    "amsoftmax",
    "cosface",
    "arcface",
    "sphereface",
    "combined",
    "curricularface",
    "adaface",
    "magface",
}
#: the heads of issue 24 (some a loss of their own, not the floor's CE): within 1.15x of floor 2
NEW_HEADS = {"elasticface", "adacos", "sphereface2", "spherefacer", "uniface", "sface", "x2softmax"}
TARGETS = {
    **{h: (1, 1.10) for h in UNNORMALISED},
    **{h: (2, 1.10) for h in NORMALISED},
    **{h: (2, 1.15) for h in NEW_HEADS},
    "rbf": (1, 1.20),
}
MEMORY_TARGET = 1.2


def build_head(name: str, d: int, c: int):
    return builders.build_head(resolve_head(OmegaConf.load(CONFIGS / f"{name}.yaml")), d, c)  # as the trainer does


class Contender:
    """One step function plus the leaves whose gradients it produces."""

    def __init__(self, step, leaves, before=None):
        self.step, self.leaves, self.before = step, leaves, before

    def reset(self):
        for t in self.leaves:
            t.grad = None
        if self.before is not None:
            self.before()

    def timed(self) -> float:
        self.reset()
        start = time.perf_counter()
        self.step()
        return time.perf_counter() - start


def make_contenders(head, b: int, d: int, c: int, seed: int = 0, probe: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=g)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]

    # every step keeps its logits until after backward, as the engine does (it reads them afterwards)
    def head_step():
        logits = head(x, labels)
        # a head that is a loss of its own returns it (HeadLoss: SphereFace2, UniFace, SFace, ...)
        loss = logits.loss if isinstance(logits, HeadLoss) else F.cross_entropy(logits, labels)
        extra = head.extra_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        if probe:  # a logging step: the criterion's statistics from the head's pure cosines
            head.cosine(x)

    w1 = head.weight.detach()[:c].clone().requires_grad_(True)
    w2 = w1.detach().clone().requires_grad_(True)
    s = float(getattr(head, "s", 30.0)) if not isinstance(getattr(head, "s", None), torch.Tensor) else float(head.s)

    def floor1():
        logits = F.linear(x, w1)
        F.cross_entropy(logits, labels).backward()

    def floor2():
        logits = F.linear(F.normalize(x), F.normalize(w2)) * s
        F.cross_entropy(logits, labels).backward()

    return {
        "head": Contender(head_step, [x, *params]),
        "floor1": Contender(floor1, [x, w1]),
        "floor2": Contender(floor2, [x, w2]),
    }


_PROFILER_WARM = False


def peak_memory(contender: Contender) -> int:
    """Peak bytes held during one step beyond what existed before it (see the module doc)."""
    from torch.profiler import ProfilerActivity, profile

    global _PROFILER_WARM
    if not _PROFILER_WARM:  # the profiler's first start is slow: pay it outside any measurement
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.ones(1).add_(1)
        _PROFILER_WARM = True
    contender.reset()
    gc.collect()
    return profiled_peak_bytes(contender.step)


def profiled_peak_bytes(step) -> int:
    """Peak bytes allocated during ``step()`` beyond what existed before it, from the CPU profiler's memory
    events in time order (benchmarks/chunked_loss.py uses it too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (ev.start_ns(), ev.nbytes()) for ev in prof.profiler.kineto_results.events() if ev.name() == "[memory]"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure(name: str, shape: str, repeats: int, probe: bool = False) -> dict:
    b, d, c = SHAPES[shape]
    torch.manual_seed(0)
    head = build_head(name, d, c)
    contenders = make_contenders(head, b, d, c, probe=probe)
    order = list(contenders)
    for key in order:  # warm-up
        contenders[key].timed()
    times = {key: [] for key in order}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for key in rotated:
                times[key].append(contenders[key].timed())
    finally:
        gc.enable()
    result = {key: statistics.median(v) for key, v in times.items()}
    result.update({f"mem_{key}": peak_memory(contenders[key]) for key in order})
    return result


def verdict(ratio: float, limit: float) -> str:
    return "PASS" if ratio <= limit else "MISS"


def main(argv=None) -> int:
    heads_all = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", default=",".join(heads_all), help="comma-separated config names")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="time the logging steps: the heads' pure cosines for the step statistics too",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per contender (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items()) + ")",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [h for h in heads if h not in heads_all] + [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown head or shape: {', '.join(unknown)}")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
        "time = median forward+backward, ratios against floors measured in the same run; "
        f"{'logging steps (probe cosines kept)' if args.probe else 'steps that log no geometry (no probe cosines)'}"
    )
    misses = {}
    for shape in shapes:
        b, d, c = SHAPES[shape]
        repeats = args.repeats or DEFAULT_REPEATS[shape]
        print(f"\n== {shape}: B={b}, D={d}, C={c:,}  ({repeats} repeats)")
        print(
            f"{'head':18s} {'ms':>8s} {'/floor1':>8s} {'/floor2':>8s} {'floor1 ms':>10s} {'floor2 ms':>10s} "
            f"{'peak MB':>8s} {'mem/f1':>7s} {'mem/f2':>7s}  {'time':14s} {'memory':14s}"
        )
        for name in heads:
            try:
                r = measure(name, shape, repeats, probe=args.probe)
            except Exception as exc:  # a head that does not build or run is reported, not fatal
                print(f"{name:18s} ERROR {type(exc).__name__}: {exc}")
                misses[shape] = misses.get(shape, 0) + 1
                continue
            t1, t2 = r["head"] / r["floor1"], r["head"] / r["floor2"]
            m1, m2 = r["mem_head"] / r["mem_floor1"], r["mem_head"] / r["mem_floor2"]
            if name in TARGETS:
                floor, limit = TARGETS[name]
                t_ratio, m_ratio = (t1, m1) if floor == 1 else (t2, m2)
                tv = f"{verdict(t_ratio, limit)} f{floor}<={limit:.2f}"
                mv = f"{verdict(m_ratio, MEMORY_TARGET)} f{floor}<={MEMORY_TARGET:.1f}"
                missed = int(t_ratio > limit) + int(m_ratio > MEMORY_TARGET)
                if missed:
                    misses[shape] = misses.get(shape, 0) + missed
            else:
                tv = mv = "n/a"
            print(
                f"{name:18s} {r['head'] * 1e3:8.2f} {t1:8.2f} {t2:8.2f} {r['floor1'] * 1e3:10.2f} "
                f"{r['floor2'] * 1e3:10.2f} {r['mem_head'] / 2**20:8.1f} {m1:7.2f} {m2:7.2f}  {tv:14s} {mv:14s}",
                flush=True,
            )
    summary = ", ".join(f"{shape} {n}" for shape, n in misses.items())
    print(f"\ntargets missed: {summary or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
