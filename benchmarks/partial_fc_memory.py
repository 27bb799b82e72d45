"""Memory per rank of Partial FC for N = 1, 2, 4 CPU processes (gloo) (not a test).

Each rank builds its shard of an ArcFace head over ``--classes`` classes (dimension ``--dim``) and runs one
forward/backward step with ``--batch`` embeddings per rank. Reported per rank: the bytes of the weight
shard (and of its gradient, the same again), the bytes of the local logits (global batch x sampled local
classes), and the peak resident memory the step added (Linux VmHWM after resetting it, minus VmRSS
before the shard was built). The weight falls as 1/N; at a fixed per-rank batch the logits stay
B_local * N * C / N = B_local * C (times sample_rate).

    python benchmarks/partial_fc_memory.py [--classes 100000] [--dim 256] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from marginlab.distributed import build_partial_fc
from marginlab.heads.arcface import ArcFaceHead

MB = 2**20


def proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return -1


def reset_peak_rss() -> None:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(rank, world, port, args, rate, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(rank)
        emb = torch.randn(args.batch, args.dim, generator=gen, requires_grad=True)
        labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
        reset_peak_rss()
        before = proc_status_kb("VmRSS")
        torch.manual_seed(0)
        pfc = build_partial_fc(partial(ArcFaceHead, args.dim), args.classes, sample_rate=rate)
        loss = pfc(emb, labels)
        loss.backward()
        n_cols = pfc.num_local if rate == 1.0 else pfc.num_sample
        result = {
            "shard_bytes": pfc.weight.nbytes,
            "grad_bytes": pfc.weight.grad.nbytes,
            "logits_bytes": args.batch * world * n_cols * 4,
            "peak_added_bytes": (proc_status_kb("VmHWM") - before) * 1024,
            "loss": loss.item(),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="embeddings per rank")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    args = parser.parse_args()
    start = time.perf_counter()
    full = args.classes * args.dim * 4
    print(
        f"ArcFace head, {args.classes} classes x {args.dim} dims: full weight {full / MB:.1f} MiB; "
        f"{args.batch} embeddings per rank; float32; peak = VmHWM - VmRSS before (per rank, max over ranks)"
    )
    print(
        f"{'N':>3} {'rate':>5} {'weight shard':>13} {'+ its grad':>11} {'local logits':>13} {'peak added':>11} "
        f"{'shard / full':>13}"
    )
    for world in args.worlds:
        for rate in args.sample_rates:  # fresh processes for each: freed memory kept by malloc would hide peaks
            with tempfile.TemporaryDirectory() as out:
                mp.start_processes(
                    worker, args=(world, free_port(), args, rate, out), nprocs=world, join=True, start_method="fork"
                )
                ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]
            shard, grad, logits, peak = (
                max(r[key] for r in ranks) for key in ("shard_bytes", "grad_bytes", "logits_bytes", "peak_added_bytes")
            )
            print(
                f"{world:>3} {rate:>5g} {shard / MB:>9.1f} MiB {grad / MB:>7.1f} MiB {logits / MB:>9.1f} MiB "
                f"{peak / MB:>7.1f} MiB {shard / full:>13.3f}"
            )
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
