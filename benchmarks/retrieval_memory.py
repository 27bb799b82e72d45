"""Peak memory and time of the retrieval metrics on a synthetic SOP-sized test set (not a test).

Stanford Online Products' test split has 60,502 images of 11,316 products; here ``--n`` random ``--dim``
embeddings with random labels over ``--classes`` classes, the queries searching each other (self excluded).
For each backend (the blocked torch search with ``--budget-mib`` MiB per block; faiss's exact flat index)
it prints the process's peak resident memory (Linux VmHWM), the part the evaluation added (VmHWM after
resetting it, minus VmRSS before), the wall time, and the float32 N x N similarity matrix it never holds.

    python benchmarks/retrieval_memory.py [--n 60502] [--dim 512] [--backends torch,faiss] [--budget-mib 1024]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch
from partial_fc_memory import MB, proc_status_kb, reset_peak_rss

from marginlab.eval.retrieval import retrieval_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60502)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11316)
    parser.add_argument("--backends", default="torch,faiss")
    parser.add_argument("--budget-mib", type=int, default=1024)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(args.n, args.dim, generator=gen)
    labels = torch.randint(0, args.classes, (args.n,), generator=gen)
    print(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "n": args.n,
                "dim": args.dim,
                "embeddings_mib": round(emb.numel() * 4 / MB),
                "avoided_nxn_float32_gib": round(args.n * args.n * 4 / 2**30, 1),
            }
        ),
        flush=True,
    )
    for backend in args.backends.split(","):
        # warm-up on 500 rows: libraries' first-call buffers and code pages are not the evaluation's memory
        retrieval_metrics(emb[:500], labels[:500] % 50, backend=backend)
        reset_peak_rss()
        before = proc_status_kb("VmRSS")
        start = time.perf_counter()
        metrics = retrieval_metrics(emb, labels, backend=backend, memory_budget=args.budget_mib * MB)
        seconds = time.perf_counter() - start
        peak = proc_status_kb("VmHWM")
        result = {
            "backend": backend,
            "budget_mib": args.budget_mib if backend == "torch" else None,
            "seconds": round(seconds, 1),
            "peak_rss_mib": round(peak / 1024),
            "added_by_eval_mib": round((peak - before) / 1024),
            "map_at_r": round(metrics["map_at_r"], 6),
            "recall_at_1": round(metrics["recall_at_1"], 6),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
