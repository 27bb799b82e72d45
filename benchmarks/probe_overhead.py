"""Cost of the geometry probe (marginlab/geometry/probe.py) per epoch (not a test).

One epoch = ``engine.train_one_epoch`` + ``engine.evaluate`` (TensorBoard on), run with the probe
(``evaluate(..., probe=...)`` + ``probe.end_epoch``: histograms, npz, scalars, and for 2-D features the
scatter figure drawn on the probe's background thread) and without it, alternately in one process
(A B B A ...), so machine noise hits both sides. Reported: the median epoch wall and CPU time of each
side, their ratio, and the probe's own timer (``probe/seconds``) as a share of the epoch. CPU time
includes the figure thread, so it shows what drawing costs on a machine with no idle core.

Then the probe's fixed per-epoch cost alone (collect 2048 samples + end_epoch) for a large head
(MS1M-like: 85,742 classes x 512), where an epoch itself takes hours.

    python benchmarks/probe_overhead.py [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from marginlab.backbones.digits_cnn import DigitsCNN
from marginlab.backbones.resnet_cifar import ResNetCifar
from marginlab.data.digits import DigitsData
from marginlab.geometry.probe import GeometryProbe
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.probe import logit_stats
from marginlab.logging import RunLog
from marginlab.training.builders import MarginModel
from marginlab.training.engine import LoopOptions, LoopState, StepParts, evaluate, train_one_epoch
from marginlab.training.precision import Precision

PROBE_SAMPLES = 2048


class Side:
    def __init__(self, name, model, run_dir: Path, with_probe: bool):
        self.name, self.model = name, copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)
        self.log = RunLog(run_dir, tensorboard=True)
        self.probe = GeometryProbe(run_dir, PROBE_SAMPLES, writer=self.log.writer) if with_probe else None
        self.state = LoopState()
        self.wall, self.cpu, self.probe_s = [], [], []

    def epoch(self, train, val, prec):
        w0, c0 = time.perf_counter(), time.process_time()
        train_one_epoch(
            StepParts(self.model, self.opt, self.sched),
            train,
            prec,
            self.state,
            LoopOptions(grad_clip=None, max_nonfinite=10, channels_last=False, log_every=10),
            log=self.log,
        )
        evaluate(self.model, val, prec, channels_last=False, probe_max_samples=PROBE_SAMPLES, probe=self.probe)
        if self.probe is not None:
            self.state.epoch += 1
            stats = self.probe.end_epoch(self.state.epoch, self.state.step, self.model.head)
            self.probe_s.append(stats["probe/seconds"])
        self.wall.append(time.perf_counter() - w0)
        self.cpu.append(time.process_time() - c0)

    def close(self):
        if self.probe is not None:
            self.probe.end_run(self.state.step)  # waits for the figure thread
        self.log.close()


def compare(title, model, train, val, repeats, tmp: Path):
    prec = Precision(torch.device("cpu"), "32")
    off = Side("no probe", model, tmp / f"{title[:8]}_off", False)
    on = Side("probe", model, tmp / f"{title[:8]}_on", True)
    off.epoch(train, val, prec), on.epoch(train, val, prec)  # warm-up
    for side in (off, on):
        side.wall.clear(), side.cpu.clear(), side.probe_s.clear()
    for i in range(repeats):
        for side in (off, on) if i % 2 == 0 else (on, off):
            side.epoch(train, val, prec)
    figure_s = on.probe.figure_seconds
    on.close(), off.close()
    n_train, n_val = sum(y.numel() for _, y in train), sum(y.numel() for _, y in val)
    print(f"\n{title}: {n_train} train + {n_val} val images per epoch, {repeats} epochs per side")
    for side in (off, on):
        wall, cpu = statistics.median(side.wall), statistics.median(side.cpu)
        print(
            f"  {side.name:9s} epoch {wall:7.3f} s wall, {cpu:7.3f} s CPU"
            f"  (medians; wall spread {min(side.wall):.3f}-{max(side.wall):.3f})"
        )
    wall = statistics.median(on.wall) / statistics.median(off.wall) - 1
    cpu = statistics.median(on.cpu) / statistics.median(off.cpu) - 1
    fastest = min(on.wall) / min(off.wall) - 1  # the least disturbed epoch of each side
    own = statistics.median(on.probe_s) / statistics.median(on.wall)
    print(
        f"  probe overhead: {100 * wall:+.1f}% wall, {100 * cpu:+.1f}% CPU (ratio of medians), {100 * fastest:+.1f}% "
        f"wall (fastest epochs); probe's own timer {1000 * statistics.median(on.probe_s):.1f} ms/epoch (median) = "
        f"{100 * own:.2f}% of the median epoch, {100 * min(on.probe_s) / min(on.wall):.2f}% of the fastest; "
        f"figures {1000 * figure_s / (repeats + 1):.0f} ms/epoch on the background thread"
    )


def large_head(tmp: Path, num_classes=85_742, dim=512, batch=256):
    head = AMSoftmaxHead(dim, num_classes).eval()
    probe = GeometryProbe(tmp / "large", PROBE_SAMPLES)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(batch, dim, generator=gen), torch.randint(0, num_classes, (batch,), generator=gen))
        for _ in range(PROBE_SAMPLES // batch)
    ]
    times = []
    with torch.no_grad():
        for epoch in range(3):
            collect = 0.0
            for x, y in batches:
                logits = head(x)  # the forward evaluate runs anyway (not probe cost)
                t0 = time.perf_counter()
                # what evaluate adds for the probe: the statistics off the logits (else a second product)
                nearest = logit_stats(head, logits, x, y)
                cos = None if nearest is not None else head.cosine(x)
                probe.collect(x, cos, y, logits.argmax(1), nearest=nearest)
                collect += time.perf_counter() - t0
            t0 = time.perf_counter()
            probe.end_epoch(epoch + 1, epoch, head)
            times.append((collect, time.perf_counter() - t0))
    collect, end = min(times, key=sum)
    print(
        f"\nlarge head {num_classes} x {dim}, {PROBE_SAMPLES} probe samples: collect {1000 * collect:.0f} ms "
        f"(top-2 of the logits per batch), end_epoch {1000 * end:.0f} ms (pairwise angles of 2048 sampled "
        f"classes, histograms, npz) per epoch"
    )


def digits(batch_size=64):
    data = DigitsData(batch_size=batch_size, seed=0)
    data.setup()
    data.set_epoch(0)
    return [(x.clone(), y.clone()) for x, y in data.train_loader()], [(x, y) for x, y in data.test_loader()]


def random_images(n_batches, batch, classes, gen):
    return [
        (torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
        for _ in range(n_batches)
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller ResNet epoch")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train, val = digits()
        compare(
            "digits default: DigitsCNN (D=64) + AM-Softmax",
            MarginModel(DigitsCNN(64, 1, 8), AMSoftmaxHead(64, 10), nn.ModuleDict()),
            train,
            val,
            repeats,
            tmp,
        )
        compare(
            "digits 2-D: DigitsCNN (D=2) + AM-Softmax, per-epoch scatter figure",
            MarginModel(DigitsCNN(2, 1, 8), AMSoftmaxHead(2, 10), nn.ModuleDict()),
            train,
            val,
            repeats,
            tmp,
        )
        gen = torch.Generator().manual_seed(0)
        steps = 10 if args.quick else 40
        compare(
            f"ResNet-20 (D=128) + ArcFace, 100 classes, random 3x32x32: {steps} train steps of 128 (a CIFAR "
            "epoch is 391), 2048 val",
            MarginModel(ResNetCifar(128, 20), ArcFaceHead(128, 100), nn.ModuleDict()),
            random_images(steps, 128, 100, gen),
            random_images(16, 128, 100, gen),
            max(2, repeats - 2),
            tmp,
        )
        large_head(tmp)


if __name__ == "__main__":
    main()
