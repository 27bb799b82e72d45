"""images/s of the in-memory data path against torchvision Dataset + DataLoader (not a test).

A fake CIFAR-10 is written in the real pickle format (``cifar-10-batches-py/data_batch_1..5``,
``test_batch``, ``batches.meta``) into a temporary directory and read by ``CIFAR10Data`` itself
(its torchvision ``CIFAR10`` class, minus the md5 check that generated files cannot pass). Both paths
do the same work per epoch: shuffle, random crop 32 with padding 4, horizontal flip, scale to [0, 1],
normalise, batches of 128 as float32 tensors. The DataLoader path runs with num_workers 0 and 2
(persistent workers, warmed up); the sides alternate and the median epoch time of each is compared.

    python benchmarks/data_pipeline.py [--images 10000] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets

from marginlab.data.in_memory import in_memory_loader
from marginlab.data.torchvision_sets import CIFAR10Data


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 reader without the md5s of the official files (``check_integrity(path, None)``
    only checks that the file exists)."""

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


def write_fake_cifar10(root: Path, n_train: int, n_test: int = 1000) -> None:
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = n_train // 5
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        with open(folder / name, "wb") as f:
            pickle.dump(
                {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}, f
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def cifar_module(root: Path, num_workers: int, batch_size: int) -> CIFAR10Data:
    data = CIFAR10Data(root=str(root), download=False, augment=True, batch_size=batch_size, num_workers=num_workers)
    data.dataset_cls = UncheckedCIFAR10
    data.setup()
    return data


def epoch_time(data, loader, epoch: int, device: torch.device) -> tuple[float, int]:
    data.set_epoch(epoch)
    start, n = time.perf_counter(), 0
    for images, labels in loader:
        images = images.to(device, non_blocking=True)  # what the engine does with each batch
        labels = labels.to(device, non_blocking=True)
        n += labels.numel()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="training images of the fake CIFAR-10")
    parser.add_argument("--repeats", type=int, default=5, help="epochs per side")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_fake_cifar10(root, args.images)
        sides = {}
        memory_data = cifar_module(root, 0, args.batch_size)
        t0 = time.perf_counter()
        sides["in-memory (uint8 on device, batched crop/flip)"] = (
            memory_data,
            in_memory_loader(memory_data, "train", device),
        )
        decode_s = time.perf_counter() - t0
        for workers in (0, 2):
            data = cifar_module(root, workers, args.batch_size)
            sides[f"Dataset + DataLoader, num_workers={workers}"] = (data, data.train_loader())
        times = {name: [] for name in sides}
        count = {}
        for name, (data, loader) in sides.items():  # warm-up: worker start, allocator
            epoch_time(data, loader, 0, device)
        for r in range(args.repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                data, loader = sides[name]
                seconds, count[name] = epoch_time(data, loader, r + 1, device)
                times[name].append(seconds)
    print(
        f"fake CIFAR-10 ({args.images} train images, pickle format), batch {args.batch_size}, crop 32 pad 4 + flip + "
        f"normalise, {args.repeats} epochs per side, device {device}, {args.threads} torch thread(s)"
    )
    print(f"in-memory setup (decode to a uint8 tensor, move to the device): {decode_s * 1e3:.0f} ms")
    rates = {name: count[name] / statistics.median(ts) for name, ts in times.items()}
    ours = next(iter(rates))
    for name, rate in rates.items():
        print(f"  {rate:10.0f} images/s  {name}   (epochs {min(times[name]):.3f}-{max(times[name]):.3f} s)")
    for name, rate in list(rates.items())[1:]:
        print(f"  ratio in-memory / ({name}): {rates[ours] / rate:.1f}x")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
