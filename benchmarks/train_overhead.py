"""Overhead of marginlab's training loop over a minimal hand-written PyTorch loop (not a test).

Both loops train the same model (backbone + head) on the same batches with the same optimizer; the
marginlab side is ``engine.train_one_epoch`` with logging and the geometry probe on (a RunLog writing
TensorBoard, ``log_every=10``). They run alternately in one process (A B B A ...) on chunks of
steps; the headline is the median over pairs of adjacent chunks of (marginlab time / plain time), so
machine noise hits both sides. Wall time and the process's CPU time are both reported (CPU time is
less sensitive to other processes on a shared machine). One intra-op thread by default: on a
busy 2-core machine two OpenMP threads spend most of each step waiting for each other.

Then the per-step cost of each piece of engine.py that the plain loop does not have is timed on
its own, in microseconds.

    python benchmarks/train_overhead.py [--repeats 11] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import timeit
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from marginlab.backbones.digits_cnn import DigitsCNN
from marginlab.backbones.resnet_cifar import ResNetCifar
from marginlab.data.digits import DigitsData
from marginlab.geometry.stats import batch_geometry
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.logging import RunLog
from marginlab.losses import criterion_for
from marginlab.training.builders import MarginModel
from marginlab.training.engine import LoopOptions, LoopState, StepParts, train_one_epoch
from marginlab.training.precision import Precision

LOG_EVERY = 10


def make_optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def plain_epoch(model, batches, opt, sched):
    """The hand-written loop: forward, cross-entropy, backward, step."""
    model.train()
    for images, labels in batches:
        _, logits = model(images, labels)
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


class Side:
    """One side of the comparison: its own copy of the model and optimizer, and its timings."""

    def __init__(self, name, model, run):
        self.name, self.model = name, copy.deepcopy(model)
        self.opt, self.sched = make_optimizer(self.model)
        self.run = run
        self.wall, self.cpu = [], []

    def time_once(self):
        w0, c0 = time.perf_counter(), time.process_time()
        self.run(self)
        self.wall.append(time.perf_counter() - w0)
        self.cpu.append(time.process_time() - c0)


def compare(title, model, batches, repeats, log_dir: Path, warmup=None, fixed_us=None):
    n_images = sum(labels.numel() for _, labels in batches)
    log = RunLog(log_dir / title.split()[0], tensorboard=True)
    state = LoopState()
    prec = Precision(torch.device("cpu"), "32")

    todo = [batches]

    def marginlab_run(side):
        train_one_epoch(
            StepParts(side.model, side.opt, side.sched),
            todo[0],
            prec,
            state,
            LoopOptions(grad_clip=None, max_nonfinite=10, channels_last=False, log_every=LOG_EVERY),
            log=log,
        )

    plain = Side("plain loop", model, lambda side: plain_epoch(side.model, todo[0], side.opt, side.sched))
    ours = Side("marginlab", model, marginlab_run)
    todo[0] = batches[:warmup] if warmup else batches
    plain.time_once(), ours.time_once()  # warm-up (allocator, TensorBoard file)
    todo[0] = batches
    plain.wall.clear(), plain.cpu.clear(), ours.wall.clear(), ours.cpu.clear()
    for i in range(repeats):
        for side in (plain, ours) if i % 2 == 0 else (ours, plain):  # A B B A ...: no side always goes first
            side.time_once()
    log.close()
    print(f"\n{title}: chunks of {len(batches)} steps ({n_images} images) x {repeats} per side")
    for side in (plain, ours):
        w, c = statistics.median(side.wall), statistics.median(side.cpu)
        print(
            f"  {side.name:11s} {n_images / w:9.1f} images/s (wall, median)   {n_images / c:9.1f} images/s (CPU time)"
            f"   spread {min(side.wall):.3f}-{max(side.wall):.3f} s"
        )
    wall_ratio = statistics.median(ours.wall) / statistics.median(plain.wall)
    cpu_ratio = statistics.median(ours.cpu) / statistics.median(plain.cpu)
    paired_wall = statistics.median(o / p for o, p in zip(ours.wall, plain.wall))
    paired_cpu = statistics.median(o / p for o, p in zip(ours.cpu, plain.cpu))
    per_step_us = statistics.median(o - p for o, p in zip(ours.cpu, plain.cpu)) / len(batches) * 1e6
    print(
        f"  time ratio marginlab / plain, median of paired chunks: wall {paired_wall:.3f}, CPU {paired_cpu:.3f} "
        f"(ratio of medians: wall {wall_ratio:.3f}, CPU {cpu_ratio:.3f})"
    )
    print(
        f"  -> overhead {100 * (paired_cpu - 1):+.1f}% (CPU), {100 * (paired_wall - 1):+.1f}% (wall); "
        f"{per_step_us:+.0f} us CPU per step"
    )
    if fixed_us is not None:
        step_us = statistics.median(plain.cpu) / len(batches) * 1e6
        print(
            f"  expected from the fixed cost per step ({fixed_us:.0f} us over a {step_us / 1e3:.1f} ms step): "
            f"{100 * fixed_us / step_us:+.2f}%"
        )
    return per_step_us


def engine_pieces(model, batches):
    """Per-step cost (us) of each thing engine.train_one_epoch does beyond the plain loop."""
    images, labels = batches[0]
    model.train()
    embeddings, logits = model(images, labels)
    loss = F.cross_entropy(logits, labels)
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    log_dir = Path(tempfile.mkdtemp())
    log = RunLog(log_dir, tensorboard=True)
    prec = Precision(torch.device("cpu"), "32")
    opt, _ = make_optimizer(model)
    criterion = criterion_for(model)  # what train_one_epoch builds once per epoch

    def log_step():  # engine.py: the `if state.step % log_every == 0` block
        stats = {
            "loss": loss.item(),
            "acc": (logits.argmax(1) == labels).float().mean().item(),
            "lr": opt.param_groups[0]["lr"],
        }
        stats.update(batch_geometry(embeddings.detach(), model.head.cosine(embeddings), labels, model.head))
        log.scalars(stats, 1, prefix="step/")

    def accumulate():
        nonlocal loss_sum, correct
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()

    def all_finite():  # DistContext.all_finite in a single process
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        return bool(finite.item())

    pieces = {
        "if not torch.isfinite(loss)  (non-finite check, sync)": lambda: bool(torch.isfinite(loss)),
        "dist.all_finite(loss)  (current engine, 1 process)": all_finite,
        "criterion.from_head_output  (vs F.cross_entropy alone)": lambda: criterion.from_head_output(
            embeddings, logits, labels
        ),
        "F.cross_entropy alone": lambda: F.cross_entropy(logits.float(), labels),
        "loss_sum += ...; correct += ...  (accumulation)": accumulate,
        "prec.autocast() enter/exit  (precision 32)": lambda: prec.autocast().__enter__(),
        "scaler.scale(loss) + scaler.update()  (disabled)": lambda: (prec.scaler.scale(loss), prec.scaler.update()),
        "to_device(batch)  (CPU, no copy)": lambda: (
            images.to("cpu", non_blocking=True),
            labels.to("cpu", non_blocking=True),
        ),
        f"log block (2 .item(), batch_geometry, 13 TensorBoard scalars) / {LOG_EVERY}": log_step,
    }
    print(f"\nengine.py pieces the plain loop does not run (DigitsCNN batch {labels.numel()}; us per step):")
    for name, fn in pieces.items():
        fn()
        n = 200 if "log block" not in name else 50
        us = min(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6
        if "log block" in name:
            us /= LOG_EVERY
        print(f"  {us:8.1f}  {name}")
    from tqdm import tqdm

    t0 = time.perf_counter()
    for _ in tqdm(range(10_000), disable=True):
        pass
    print(f"  {(time.perf_counter() - t0) / 10_000 * 1e6:8.1f}  tqdm(disable=True) per iteration")
    log.close()


def digits_batches(batch_size=64):
    data = DigitsData(batch_size=batch_size, seed=0)
    data.setup()
    data.set_epoch(0)
    return [(x.clone(), y.clone()) for x, y in data.train_loader()]


def cifar_batches(steps, batch_size=128):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch_size,), generator=gen))
        for _ in range(steps)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11, help="chunks per side (ResNet-20: 2, or 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no ResNet-20 repeat")
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    with tempfile.TemporaryDirectory() as tmp:
        digits = digits_batches()[:20]  # 20 steps: 2 logging steps per chunk
        tiny = MarginModel(nn.Sequential(nn.Flatten(), nn.Linear(64, 16)), AMSoftmaxHead(16, 10), nn.ModuleDict())
        fixed_us = compare(
            "Linear 64->16 + AM-Softmax (almost no compute: the fixed cost per step)",
            tiny,
            digits * 5,
            repeats,
            Path(tmp),
        )
        model = MarginModel(DigitsCNN(64, 1, 8), AMSoftmaxHead(64, 10), nn.ModuleDict())
        compare(
            "DigitsCNN + AM-Softmax, digits (in memory), batch 64", model, digits, repeats, Path(tmp), fixed_us=fixed_us
        )
        model = MarginModel(ResNetCifar(128, 20), ArcFaceHead(128, 10), nn.ModuleDict())
        compare(
            "ResNet-20 + ArcFace, random 3x32x32, batch 128 (2 pairs: the ratio is within noise)",
            model,
            cifar_batches(LOG_EVERY),
            1 if args.quick else 2,
            Path(tmp),
            warmup=1,
            fixed_us=fixed_us,
        )
        engine_pieces(MarginModel(DigitsCNN(64, 1, 8), AMSoftmaxHead(64, 10), nn.ModuleDict()), digits)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
