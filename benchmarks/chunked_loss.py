"""The chunked margin loss (``head.chunked=true``, heads/kernels/chunked_margin_ce.py) against the
``F.linear + cross-entropy`` floor: peak memory and time of one forward + backward.

Contenders, with the same x (B x D), labels and W (C x D), each step ``loss.backward()`` to x and W:

* floor -- ``F.cross_entropy(F.linear(x, W), labels)``: a plain linear classifier, the B x C logits;
* arcface -- ``F.cross_entropy(ArcFaceHead(x, labels), labels)``: the head as it trains today (fused);
* chunked -- ``ArcFaceHead(chunked=True).chunked_loss(x, labels)``: the same loss in class blocks.

Time: the three run in turn (the order rotating every repeat) after one warm-up step each; the ratio to the
floor is taken per repeat and printed as its median with the min-max spread.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over one step minus what was allocated before it;
on the CPU one step is run under ``torch.profiler`` with ``profile_memory=True`` and its allocation events
replayed in time order (as benchmarks/heads.py). Gradients are reset to None before the step, so every
contender allocates its own dW (C x D), which every path must write: the peak is printed with it and
without it ("beyond dW": the loss's own temporaries, what chunking removes).

Targets (issue 16): peak memory <= 0.3x the floor's and time <= 1.15x, at (128, 512, 85,742) and
(256, 512, 1,000,000). ``--quick`` runs smaller shapes that fit a loaded 2-core CPU.

Usage: ``python benchmarks/chunked_loss.py [--quick] [--shapes casia,1m] [--repeats N] [--threads N]
[--chunk-size N] [--device cpu|cuda]``.
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

from marginlab.heads.arcface import ArcFaceHead  # noqa: E402

FULL = {"casia": (128, 512, 85_742), "1m": (256, 512, 1_000_000)}
QUICK = {"casia/4": (128, 512, 21_436), "100k": (64, 128, 100_000)}
CONTENDERS = ("floor", "arcface", "chunked")


def make_steps(b: int, d: int, c: int, device: str, chunk_size: int | None):
    """name -> (step, params): one forward + backward of each contender on shared data."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, d, generator=gen).to(device).requires_grad_(True)
    labels = torch.randint(0, c, (b,), generator=gen).to(device)
    head = ArcFaceHead(d, c).to(device)
    chunked = ArcFaceHead(d, c, chunked=True, chunk_size=chunk_size).to(device)
    chunked.weight = head.weight  # the same W
    weight = head.weight

    def floor():
        F.cross_entropy(F.linear(x, weight), labels).backward()

    def arcface():
        F.cross_entropy(head(x, labels), labels).backward()

    def chunk():
        chunked.chunked_loss(x, labels).backward()

    return {"floor": floor, "arcface": arcface, "chunked": chunk}, (x, weight)


def reset(params) -> None:
    for p in params:
        p.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(step, params, device: str) -> int:
    """Peak bytes held during one step beyond what existed before it (see the module doc)."""
    reset(params)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from heads import profiled_peak_bytes  # benchmarks/heads.py, beside this script

    return profiled_peak_bytes(step)


def measure(shape, repeats: int, device: str, chunk_size: int | None) -> dict:
    b, d, c = shape
    steps, params = make_steps(b, d, c, device, chunk_size)
    if device == "cpu":  # the profiler's first start is slow: pay it outside any measurement
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.ones(1).add_(1)
    times = {name: [] for name in CONTENDERS}
    for name in CONTENDERS:  # warm-up
        reset(params)
        steps[name]()
    for r in range(repeats):
        order = CONTENDERS[r % 3 :] + CONTENDERS[: r % 3]
        for name in order:
            reset(params)
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    memory = {name: peak_memory(steps[name], params, device) for name in CONTENDERS}
    grad_w = c * d * params[1].element_size()
    return {"times": times, "memory": memory, "grad_w": grad_w}


def ratio_text(values: list[float]) -> str:
    return f"{statistics.median(values):5.2f}x ({min(values):.2f}-{max(values):.2f})"


def report(label: str, shape, result: dict) -> None:
    b, d, c = shape
    times, memory, grad_w = result["times"], result["memory"], result["grad_w"]
    floor = times["floor"]
    mib = 2**20
    print(f"\n(B, D, C) = ({b}, {d}, {c:,}) [{label}]  dW = {grad_w / mib:.0f} MiB")
    print(
        f"  {'':8s} {'time ms':>16s} {'time / floor':>22s} {'peak MiB':>9s} {'/ floor':>8s} "
        f"{'beyond dW':>10s} {'/ floor':>8s}"
    )
    for name in CONTENDERS:
        ms = [1e3 * t for t in times[name]]
        ratios = [t / f for t, f in zip(times[name], floor)]
        peak, beyond = memory[name], memory[name] - grad_w
        floor_beyond = memory["floor"] - grad_w
        print(
            f"  {name:8s} {statistics.median(ms):8.1f} ({min(ms):.0f}-{max(ms):.0f}) {ratio_text(ratios):>22s} "
            f"{peak / mib:9.0f} {peak / memory['floor']:7.2f}x {beyond / mib:10.0f} "
            f"{beyond / max(floor_beyond, 1):7.2f}x"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=None, help="classes per block (default: 4M elements)")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join([*FULL, *QUICK])}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = QUICK if args.quick else FULL
    if args.shapes:
        known = {**FULL, **QUICK}
        unknown = [k for k in args.shapes.split(",") if k not in known]
        if unknown:
            parser.error(f"--shapes {','.join(unknown)}: not a shape; choose from {', '.join(known)}")
        shapes = {k: known[k] for k in args.shapes.split(",")}
    print(
        f"device {args.device}, {torch.get_num_threads()} threads, {args.repeats} repeats; "
        "time ratios: median (min-max) of per-repeat ratios to the floor; targets: memory <= 0.3x, time <= 1.15x"
    )
    for label, shape in shapes.items():
        report(label, shape, measure(shape, args.repeats, args.device, args.chunk_size))


if __name__ == "__main__":
    main()
