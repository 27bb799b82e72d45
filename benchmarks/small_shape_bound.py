"""How close any margin head can come to the normalised-cosine floor at the small shape (not a test).

At (B, D, C) = (256, 2, 10) a forward+backward step is ~0.2 ms of per-op dispatch and autograd
bookkeeping, not arithmetic, so a head's cost is set by how many ops it runs. This times, alternately
in one run (median of repeats), against floor 2 = ``F.linear(F.normalize(x), F.normalize(W)) * s + CE``:

* the least a target-column margin can add in plain autograd ops, written three ways for the
  additive cosine margin: gather + subtract + scatter (what the issue's rules allow), ``index_put``
  with ``accumulate``, and a B x C one-hot (which the issue forbids: it is listed only as the cheapest
  conceivable form); and ArcFace's angular margin with gather + scatter;
* marginlab's AM-Softmax and ArcFace heads.

The ratios of the plain-op forms are the practical lower bound for the ``<= 1.10x floor 2`` target
at this shape in eager PyTorch.

    python benchmarks/small_shape_bound.py [--repeats 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marginlab.heads.amsoftmax import AMSoftmaxHead  # noqa: E402
from marginlab.heads.arcface import ArcFaceHead  # noqa: E402

B, D, C, S, M = 256, 2, 10, 30.0, 0.35


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(B, D, requires_grad=True)
    labels = torch.randint(C, (B,))
    rows = torch.arange(B)
    amsoftmax, arcface = AMSoftmaxHead(D, C, s=S, m=M), ArcFaceHead(D, C, s=S, m=M)
    weight = amsoftmax.weight

    def floor2():
        return F.linear(F.normalize(x), F.normalize(weight)) * S

    def gather_scatter():  # AM-Softmax eq.: s (cos theta_y - m) in the target column, B entries touched
        cos = F.linear(F.normalize(x), F.normalize(weight))
        target = cos.gather(1, labels.view(-1, 1))
        return (cos * S).scatter(1, labels.view(-1, 1), (target - M) * S)

    def index_put():
        logits = F.linear(F.normalize(x) * S, F.normalize(weight))
        return logits.index_put((rows, labels), torch.tensor(-M * S), accumulate=True)

    cos_m, sin_m = math.cos(M), math.sin(M)

    def arcface_plain():  # ArcFace eq. 3 with InsightFace's fallback, B target entries only
        cos = F.linear(F.normalize(x), F.normalize(weight))
        target = cos.gather(1, labels.view(-1, 1))
        phi = target * cos_m - (1.0 - target * target).clamp_min(1e-12).sqrt() * sin_m
        phi = torch.where(target > -cos_m, phi, target - M * sin_m)
        return (cos * S).scatter(1, labels.view(-1, 1), phi * S)

    def one_hot():  # forbidden by the issue (a B x C one-hot); the cheapest form in op count
        return (F.linear(F.normalize(x), F.normalize(weight)) - F.one_hot(labels, C) * M) * S

    contenders = {"floor 2": floor2, "plain: gather+scatter": gather_scatter, "plain: index_put": index_put,
                  "plain: one-hot (not allowed)": one_hot, "plain arcface: gather+scatter": arcface_plain,
                  "marginlab amsoftmax": lambda: amsoftmax(x, labels),
                  "marginlab arcface": lambda: arcface(x, labels)}
    times = {name: [] for name in contenders}
    for _ in range(args.repeats + 10):
        for name, logits in contenders.items():
            start = time.perf_counter()
            F.cross_entropy(logits(), labels).backward()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[10:]) for name, t in times.items()}  # the first 10: warm-up
    floor = medians["floor 2"]
    print(f"torch {torch.__version__}, {args.threads} thread(s), B={B} D={D} C={C}, median of {args.repeats}")
    print(f"{'contender':32} {'ms':>7} {'/floor2':>8}")
    for name, value in medians.items():
        print(f"{name:32} {value * 1e3:7.3f} {value / floor:8.2f}")


if __name__ == "__main__":
    main()
