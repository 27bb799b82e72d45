"""images/s per CPU core of the face RecordIO path against a plain PIL + torchvision-transforms DataLoader (not a test).

A synthetic ``train.rec``/``train.idx`` (InsightFace layout, real 112x112 JPEGs at quality 95, photo-like
content: smooth gradients plus noise, ~8 kB an image like faces_webface_112x112) is written to a temporary
directory. Every side reads the same records, shuffles, flips at random, normalises to [-1, 1] and yields
batches of ``--batch-size`` (default 128):

* baseline: a Dataset that reads a record, ``PIL.Image.open(...).convert("RGB")``, then
  ``T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(0.5, 0.5)])``; DataLoader default collate;
* marginlab decode=pil: the per-image path (PIL decode, flip, normalise per image in the worker);
* marginlab decode=cpu, worker side: one ``torchvision.io.decode_jpeg`` call per batch, uint8 batches -- the
  CPU work per image when flip and normalisation run on the GPU (the figure that sizes the CPU);
* marginlab decode=cpu, end to end on the CPU: the same plus flip and normalisation done on the CPU as the
  "device" (what a CPU-only run pays);
* marginlab decode=cuda, worker side: read the records and ship the encoded bytes (the GPU decodes).

Per core: one process, one torch thread, ``num_workers=0`` -- a worker process does exactly this work, so
images/s here is images/s per worker core. The sides alternate for ``--repeats`` epochs; each ratio is the
median of the per-epoch ratios against the baseline epoch next to it, with its min-max. The last line says
how many worker cores the ``--target`` (5,000 images/s, an H100-class GPU on IResNet-50) needs.

    python benchmarks/face_pipeline.py [--images 2048] [--repeats 5] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from marginlab.data.face.batched import BatchedFaces, collate_encoded
from marginlab.data.face.casia import CasiaData
from marginlab.data.face.recordio import open_face_records, unpack, write_face_records


def photo_like(seed: int, size: int = 112) -> np.ndarray:
    """Smooth colour gradients + Gaussian noise: compresses like a face crop (not like flat test patterns)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b, c = rng.uniform(-1, 1, (3, 3))
    img = np.stack([128 + 100 * np.sin(3 * (a[i] * x + b[i] * y) + c[i]) for i in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_records(root: Path, n: int, identities: int, size: int = 112) -> float:
    """``root/train.rec`` + ``.idx``: ``n`` JPEGs (size x size, quality 95), labels ``i % identities``; returns
    the mean bytes an image."""
    samples = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(photo_like(i, size)).save(buf, format="JPEG", quality=95)
        samples.append((buf.getvalue(), i % identities))
    write_face_records(root, samples, style="insightface")
    return float(np.mean([len(s) for s, _ in samples]))


class PilRecords(Dataset):
    """The baseline: a record -> PIL -> torchvision transforms, one image at a time."""

    def __init__(self, root: Path):
        from torchvision import transforms as T

        self.index = open_face_records(root / "train.rec", root / "train.idx")
        self.transform = T.Compose([T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def __len__(self) -> int:
        return len(self.index.keys)

    def __getitem__(self, i: int):
        record = self.index.rec.read_record(
            int(self.index.offsets[i]), int(self.index.keys[i]), int(self.index.lengths[i])
        )
        _, payload = unpack(record)
        with Image.open(io.BytesIO(payload)) as img:
            return self.transform(img.convert("RGB")), int(self.index.labels[i])


def epoch(batches) -> tuple[float, int]:
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch[1])  # labels (the lengths of an encoded batch)
    return time.perf_counter() - start, n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--identities", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="epochs per side")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--target", type=float, default=5000.0, help="images/s the GPU consumes")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mean_bytes = write_records(root, args.images, args.identities)

        def casia(decode: str):
            data = CasiaData(root=str(root), decode=decode, batch_size=args.batch_size, num_workers=0, drop_last=False)
            data.setup()
            return data

        baseline = "PIL + torchvision transforms DataLoader (baseline)"
        pil, cpu = casia("pil"), casia("cpu")
        cpu_loader = cpu.train_loader()
        encoded = DataLoader(
            BatchedFaces(cpu.train_set, encoded=True),
            batch_size=args.batch_size,
            shuffle=True,
            collate_fn=collate_encoded,
        )
        sides = {
            baseline: DataLoader(PilRecords(root), batch_size=args.batch_size, shuffle=True),
            "marginlab decode=pil (per-image PIL path)": pil.train_loader(),
            "marginlab decode=cpu, worker side (uint8 batches)": cpu_loader.loader,
            "marginlab decode=cpu, end to end on the CPU (+ flip, normalise)": cpu_loader,
            "marginlab decode=cuda, worker side (read only; the GPU decodes)": encoded,
        }
        for loader in sides.values():  # warm-up: imports, allocator, page cache
            epoch(loader)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(args.repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for data in (pil, cpu):
                data.set_epoch(r + 1)
            for name in order:
                seconds, n = epoch(sides[name])
                times[name].append(n / seconds)
    print(
        f"synthetic faces_webface-style train.rec: {args.images} JPEG images 112x112 (mean {mean_bytes / 1e3:.1f} kB), "
        f"batch {args.batch_size}, random flip + normalise to [-1, 1]; one process, 1 torch thread, num_workers=0, "
        f"{args.repeats} epochs per side, alternating; machine: {os.cpu_count()} CPU(s), torch {torch.__version__}"
    )
    base = times[baseline]
    for name, rates in times.items():
        ratios = [a / b for a, b in zip(rates, base)]
        print(
            f"  {statistics.median(rates):8.0f} images/s per core ({min(rates):.0f}-{max(rates):.0f})"
            + (
                ""
                if name == baseline
                else f"   {statistics.median(ratios):.2f}x baseline ({min(ratios):.2f}-{max(ratios):.2f})"
            )
            + f"   {name}"
        )
    for name in (
        "marginlab decode=cpu, worker side (uint8 batches)",
        "marginlab decode=cuda, worker side (read only; the GPU decodes)",
        baseline,
    ):
        rate = statistics.median(times[name])
        print(
            f"{args.target:.0f} images/s needs {math.ceil(args.target / rate)} worker core(s) at "
            f"{rate:.0f} images/s per core: {name}"
        )
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
