"""Training images/s and peak memory of IResNet-50 + ArcFace at 112x112 on a GPU (not a test).

Rows: the head (ArcFace over ``--classes`` = 85,742, MS1M's identities; Partial FC with sample rate 0.1 over
``--pfc-classes`` = 1,000,000) x ``torch.compile`` off/on x the data (synthetic: one normalised batch kept on the
device; recordio: a synthetic ``train.rec`` of JPEGs read through ``CasiaData`` with ``dataset.decode=auto``
and ``--workers`` DataLoader workers, as training reads it). Every row: bf16 autocast, channels_last, SGD
(momentum 0.9, weight decay 5e-4), ``--warmup`` untimed steps then ``--steps`` timed ones; images/s is timed
steps x batch / seconds (synchronised), peak memory is ``torch.cuda.max_memory_allocated`` of the row (on the
CPU: the peak resident set the row added). The step is the trainer's: forward under autocast, the criterion
the trainer builds (``criterion_for``), backward, optimizer step; compile wraps what the trainer wraps (the
whole model; the backbone alone with Partial FC).

``--tiny`` runs the same code at toy size on the CPU in a few seconds (IResNet-18 at 16x16, 16-d embeddings,
tens of classes, batch 4, 2 steps, compile with the ``eager`` backend): the test suite runs it so the script
never rots. Without a GPU and without ``--tiny`` it says so and exits 0.

    python benchmarks/gpu_throughput.py [--batch-size 128] [--steps 20] [--workers 8]
    python benchmarks/gpu_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from face_pipeline import write_records

from marginlab.backbones.iresnet import IResNet
from marginlab.data.face.casia import CasiaData
from marginlab.distributed.partial_fc import build_partial_fc
from marginlab.heads.arcface import ArcFaceHead
from marginlab.losses import criterion_for
from marginlab.training.builders import MarginModel

MB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (what the test suite runs)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=85_742)
    parser.add_argument("--pfc-classes", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--images", type=int, default=4096, help="records in the synthetic train.rec")
    parser.add_argument("--compile", choices=("both", "off", "on"), default="both")
    parser.add_argument("--data", choices=("both", "synthetic", "recordio"), default="both")
    args = parser.parse_args(argv)
    args.depth, args.dim, args.size, args.backend = 50, 512, 112, "inductor"
    if args.tiny:
        args.depth, args.dim, args.size, args.backend = 18, 16, 16, "eager"
        args.batch_size, args.classes, args.pfc_classes = 4, 20, 200
        args.steps, args.warmup, args.workers, args.images = 2, 1, 0, 16
    return args


class PeakMemory:
    """Peak bytes a block adds: CUDA's allocator statistics, or Linux's peak resident set (VmHWM, reset by
    writing 5 to /proc/self/clear_refs) on the CPU; None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = self._status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = self._status_kb("VmHWM")
            self.peak = None if hwm is None or self.base is None else (hwm - self.base) * 1024


def build(args, head: str, device: torch.device) -> MarginModel:
    backbone = IResNet(embedding_dim=args.dim, image_size=args.size, depth=args.depth)
    if head == "arcface":
        margin_head = ArcFaceHead(args.dim, args.classes)
    else:  # this process holds every class (one rank); 10% of them are sampled per step
        margin_head = build_partial_fc(partial(ArcFaceHead, args.dim), args.pfc_classes, sample_rate=0.1)
    return MarginModel(backbone, margin_head, nn.ModuleDict()).to(device).to(memory_format=torch.channels_last)


def synthetic_batches(args, classes: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch_size, 3, args.size, args.size, generator=gen) * 2 - 1).to(device)
    labels = torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)
    while True:
        yield images, labels


def recordio_batches(args, root: Path, device: torch.device):
    data = CasiaData(
        root=str(root),
        image_size=args.size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        drop_last=True,
        decode="auto",
        pin_memory=device.type == "cuda",
    )
    loader = data.loaders(device).train
    epoch = 0
    while True:
        data.set_epoch(epoch)
        yield from loader
        epoch += 1


def run_row(args, head: str, compiled: bool, batches, device: torch.device) -> tuple[float, int | None]:
    torch.manual_seed(0)
    model = build(args, head, device)
    criterion = criterion_for(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    forward = model
    if compiled and head == "arcface":
        forward = torch.compile(model, backend=args.backend)
    elif compiled:  # Partial FC synchronises itself: the trainer compiles the backbone alone
        body = torch.compile(model.backbone, backend=args.backend)

        def forward(images, labels):
            embeddings = body(images)
            return embeddings, model.head(embeddings, labels)

    def step():
        images, labels = next(batches)
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            embeddings, out = forward(images, labels)
            loss = criterion.from_head_output(embeddings, out, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    with PeakMemory(device) as memory:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return args.steps * args.batch_size / seconds, memory.peak


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA GPU here; run with --tiny for the CPU smoke run")
        return 0
    device = torch.device("cuda" if not args.tiny else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        torch.set_num_threads(1)
        name = "CPU (tiny smoke run; the figures mean nothing)"
    compiles = {"both": (False, True), "off": (False,), "on": (True,)}[args.compile]
    sources = {"both": ("synthetic", "recordio"), "synthetic": ("synthetic",), "recordio": ("recordio",)}[args.data]
    print(
        f"IResNet-{args.depth} ({args.dim}-d) at {args.size}x{args.size}, batch {args.batch_size}, bf16 autocast, "
        f"channels_last, SGD; {args.warmup} warm-up + {args.steps} timed steps; {name}, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "recordio" in sources:
            write_records(root, args.images, min(args.classes, 1000), size=args.size)
        for head, classes in (("arcface", args.classes), ("partial_fc_0.1", args.pfc_classes)):
            for compiled in compiles:
                for source in sources:
                    batches = (
                        synthetic_batches(args, classes, device)
                        if source == "synthetic"
                        else recordio_batches(args, root, device)
                    )
                    rate, peak = run_row(args, head, compiled, batches, device)
                    batches.close()
                    memory = "n/a" if peak is None else f"{peak / MB:,.0f} MiB"
                    print(
                        f"  {rate:9.1f} images/s   peak {memory:>12}   {head} ({classes:,} classes), "
                        f"compile {'on ' if compiled else 'off'}, {source} data"
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
