"""How close any head can come to the floors at the small shape (not a test).

At (B, D, C) = (256, 2, 10) a forward+backward step is ~0.1-0.3 ms of per-op dispatch, autograd
bookkeeping and module calls, not arithmetic, so a head's cost is set by how many ops and calls it
makes. This times, alternately in one run (median of repeats), step functions against

* floor 1 = ``F.linear(x, W)`` + CE (targets: softmax, L-Softmax, L2-softmax within 1.15x; RBF 1.25x);
* floor 2 = ``F.linear(F.normalize(x), F.normalize(W)) * s`` + CE (target: normalised heads 1.10x).

Against floor 1 it times what no implementation of those heads can avoid:

* ``torch.nn.Linear`` (bias=True) + CE: torch's own linear layer, i.e. the softmax head's computation
  (configs/head/softmax.yaml has a bias, as the papers' baseline does) -- the module call and the
  bias gradient alone;
* floor 1 plus only the *forward values* L-Softmax's target needs (||x||, ||W_y||, cos theta_y,
  psi for m = 4 the cheapest way: cos 4 theta by Horner, the segment k by one ``bucketize``),
  computed without autograd: a lower bound for L-Softmax, whose gradient costs more again;
* floor 1 plus only the forward values RBF needs besides the product (||x||^2, ||W||^2, the exp of
  the B x C distances), without autograd: a lower bound for RBF;
* floor 1 plus only F.normalize(x) * alpha (autograd): L2-softmax's one extra step.

Against floor 2: floor 2 itself as an ``nn.Module`` and routed through an autograd Function that
does nothing (the fixed costs of a module call and of any hand-written backward, which a head pays
and the floor does not; on this machine both land within the measurement's noise, about +-10%);
floor 2 plus SphereFace's target values (psi, as for L-Softmax) without autograd; the cheapest forms of a target-column margin in plain autograd ops (gather +
subtract + scatter, ``index_put``, a B x C one-hot -- which the issue forbids, listed as the cheapest
conceivable form -- and ArcFace's angular margin), then marginlab's heads as the trainer builds them.

    python benchmarks/small_shape_bound.py [--repeats 1000] [--threads N]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from marginlab import builders  # noqa: E402
from marginlab.heads.lsoftmax import psi  # noqa: E402  (checks the bound's psi below)

B, D, C, S, M = 256, 2, 10, 30.0, 0.35


class _Identity(torch.autograd.Function):
    """Does nothing: the fixed cost of routing a step through any hand-written autograd Function."""

    @staticmethod
    def forward(ctx, logits):
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Floor2Module(torch.nn.Module):
    """Floor 2 as an nn.Module: the fixed cost of a module call (what every head is)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x, labels):
        return F.linear(F.normalize(x), F.normalize(self.weight)) * S


def build_head(name: str):
    cfg = OmegaConf.create({"head": OmegaConf.load(ROOT / "marginlab" / "configs" / "head" / f"{name}.yaml"),
                            "seed": 0})
    return builders.build_head(cfg, D, C).train()


def race(contenders: dict, labels, leaves, repeats: int) -> dict[str, float]:
    """Median step time of each contender, run in turn (rotating the order) after 20 warm-up rounds."""
    names = list(contenders)
    times = {name: [] for name in names}
    for r in range(repeats + 20):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            F.cross_entropy(contenders[name](), labels).backward()
            if r >= 20:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, medians: dict[str, float], floor: str, targets: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'contender':52} {'ms':>7} {'/' + floor:>8}  target")
    base = medians[floor]
    for name, value in medians.items():
        limit = targets.get(name)
        note = "" if limit is None else f"{'PASS' if value / base <= limit else 'MISS'} <= {limit:.2f}"
        print(f"{name:52} {value * 1e3:7.3f} {value / base:8.2f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(B, D, requires_grad=True)
    labels = torch.randint(C, (B,))
    rows, idx = torch.arange(B), labels.view(-1, 1)
    linear = torch.nn.Linear(D, C)
    weight = linear.weight
    heads = {name: build_head(name) for name in ("softmax", "lsoftmax", "l2softmax", "rbf",
                                                 "normface", "amsoftmax", "arcface")}
    for head in heads.values():
        head.weight = weight
        head.record_cosine = False  # the trainer's step that logs no geometry, as benchmarks/heads.py times
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), B={B} D={D} C={C}, "
          f"median of {args.repeats}")

    # -cos(j pi / 4), j = 1..3, ascending: bucketize(-cos) gives the segment k of theta in one op
    segment_bounds = torch.tensor([-math.cos(j * math.pi / 4) for j in (1, 2, 3)])

    def lsoftmax_values():  # the least L-Softmax's target needs (m = 4), no autograd: a lower bound
        with torch.no_grad():
            w_y = weight[labels]
            xw = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(w_y, dim=1)
            cos = torch.linalg.vecdot(x, w_y).div_(xw)
            c2 = cos * cos
            cos4 = c2.mul(8.0).sub_(8.0).mul_(c2).add_(1.0)  # cos 4 theta = 8 cos^4 - 8 cos^2 + 1
            k = torch.bucketize(-cos, segment_bounds)
            # psi = (-1)^k cos(4 theta) - 2k, then the target logit ||W_y|| ||x|| psi
            return cos4.mul_(1 - 2 * (k % 2)).sub_(2 * k).mul_(xw)

    with torch.no_grad():  # the bound computes L-Softmax's psi (m = 4) the cheapest way: check it first
        w_y = weight[labels]
        cos = torch.linalg.vecdot(x, w_y) / (x.norm(dim=1) * w_y.norm(dim=1))
        expected = psi(cos.clamp(-1, 1), 4) * x.norm(dim=1) * w_y.norm(dim=1)
    torch.testing.assert_close(lsoftmax_values(), expected, atol=1e-4, rtol=1e-4)

    def rbf_values():  # RBF's values besides x W^T, no autograd: a lower bound
        with torch.no_grad():
            x2 = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_()
            w2 = torch.linalg.vector_norm(weight, dim=1).square_()
            torch.exp(x2 + w2)

    def floor1():
        return F.linear(x, weight)

    unnormalised = {
        "floor 1: F.linear + CE": floor1,
        "torch.nn.Linear(bias=True) + CE (= the softmax head)": lambda: linear(x),
        "floor 1 + L-Softmax's target values, no autograd": lambda: (lsoftmax_values(), floor1())[1],
        "floor 1 + RBF's norms and exp, no autograd": lambda: (rbf_values(), floor1())[1],
        "floor 1 on F.normalize(x) * alpha (L2-softmax)": lambda: F.linear(F.normalize(x) * 5.0, weight),
        **{f"marginlab {name}": (lambda h=heads[name]: h(x, labels))
           for name in ("softmax", "lsoftmax", "l2softmax", "rbf")},
    }
    targets1 = {name: (1.25 if "RBF" in name or "rbf" in name else 1.15)
                for name in unnormalised if not name.startswith("floor 1:")}
    leaves = [x, *linear.parameters(), *(p for h in heads.values() for p in h.parameters())]
    report("unnormalised heads: against floor 1", race(unnormalised, labels, leaves, args.repeats),
           "floor 1: F.linear + CE", targets1)

    cos_m, sin_m = math.cos(M), math.sin(M)

    def cosine():
        return F.linear(F.normalize(x), F.normalize(weight))

    def gather_scatter():  # AM-Softmax eq. 3: s (cos theta_y - m) in the target column, B entries touched
        cos = cosine()
        return (cos * S).scatter(1, idx, (cos.gather(1, idx) - M) * S)

    def arcface_plain():  # ArcFace eq. 3 with InsightFace's fallback, B target entries only
        cos = cosine()
        target = cos.gather(1, idx)
        phi = target * cos_m - (1.0 - target * target).clamp_min(1e-12).sqrt() * sin_m
        phi = torch.where(target > -cos_m, phi, target - M * sin_m)
        return (cos * S).scatter(1, idx, phi * S)

    floor2_module = _Floor2Module(weight)
    normalised = {
        "floor 2: normalised cosine + CE": lambda: cosine() * S,
        "floor 2 as an nn.Module": lambda: floor2_module(x, labels),
        "floor 2 through an identity autograd.Function": lambda: _Identity.apply(cosine() * S),
        "floor 2 + SphereFace's target values, no autograd": lambda: (lsoftmax_values(), cosine() * S)[1],
        "plain ops: gather + scatter (AM-Softmax)": gather_scatter,
        "plain ops: index_put (AM-Softmax)": lambda: F.linear(F.normalize(x) * S, F.normalize(weight)).index_put(
            (rows, labels), torch.tensor(-M * S), accumulate=True),
        "plain ops: B x C one-hot (not allowed)": lambda: (cosine() - F.one_hot(labels, C) * M) * S,
        "plain ops: gather + scatter (ArcFace)": arcface_plain,
        **{f"marginlab {name}": (lambda h=heads[name]: h(x, labels)) for name in ("normface", "amsoftmax", "arcface")},
    }
    targets2 = {name: 1.10 for name in normalised if not name.startswith("floor 2:")}
    report("normalised heads: against floor 2", race(normalised, labels, leaves, args.repeats),
           "floor 2: normalised cosine + CE", targets2)


if __name__ == "__main__":
    main()
