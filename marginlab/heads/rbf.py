"""RBF-Softmax (Zhang et al., ECCV 2020): logits s * exp(-||x - W_j||^2 / gamma)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import class_block, no_autocast
from marginlab.heads.probe import scaled_cosine

#: exponents are kept within +-this, clear of float32's range (exp(+-87)): the factored logits need
#: exp(t_j) and exp(-||x||^2 / gamma) finite and normal; recovery needs no logit below exp(-this)
_MAX_EXPONENT = 80.0
#: entries with t_j - ||x||^2 / gamma within this of log s (d_j / gamma < this: x on a prototype) take
#: their factored logits from the exponent instead, where the clamp at d_j = 0 is decided
_NEAR = 1e-3
#: G_a elements per block of classes in the backward (4 MiB in float32): RBF is held to floor-1 memory
_BLOCK_ELEMENTS = 1 << 20


class _RBFLogits(torch.autograd.Function):
    """``s exp(-d_j / gamma)`` with ``d_j = ||x||^2 + ||W_j||^2 - 2 x.W_j`` (clamped at 0), fused.

    Forward: one ``addmm`` gives ``t_j = log s + (2 x.W_j - ||W_j||^2) / gamma`` (the C-vector term
    rides along as its bias), then in place ``exp`` and, per row, the factor ``exp(-||x||^2 / gamma)``
    (so the logits reuse the product's memory). Kept out of the exponent, the row term costs t_j nothing:
    added to the exponent first, ``||x||^2 / gamma`` (often tens) would cost every entry a rounding of its
    own size.
    Where those factors would leave float32's range (``_factorable``) or no host checks are possible
    (an accelerator), the row term goes into the exponent instead.

    Backward, with ``G_a = G * out`` (zero where clamped) and ``k = 2 / gamma``:
    ``dx = k (G_a W - rowsum(G_a) x)``, ``dW = k (G_a^T x - colsum(G_a) W)``: two matmuls and one
    C x D pass, block by block over the classes, no B x C x D tensor.

    Clamped entries (d computed <= 0: x within rounding of a prototype, rare) get no gradient, as
    ``clamp`` gives. The decision is the exponent's, ``t_j - ||x||^2 / gamma >= log s``, in either
    form: factored, the few entries near it (found from one row-max pass) take their logits from the
    exponent too, so both forms clamp the same entries. On the CPU the clamped entries are listed;
    elsewhere (no host reads on an accelerator) a B x C boolean mask is kept.
    """

    @staticmethod
    def forward(ctx, x, w, s, gamma):
        log_s, inv_gamma = math.log(s), 1.0 / gamma
        on_cpu = _host_checks(x)
        with no_autocast(x.device.type):
            x2 = torch.linalg.vecdot(x, x)  # B
            w2 = torch.linalg.vector_norm(w, dim=1).square_()  # C, no C x D temporary
            rows = x2 * inv_gamma  # ||x||^2 / gamma
            factored = on_cpu and _factorable(rows, log_s)
            # RBF-Softmax: logit_j = s exp(-d_j / gamma), d_j = ||x||^2 + ||W_j||^2 - 2 x.W_j,
            # = exp(t_j) exp(-||x||^2 / gamma),  t_j = log s + (2 x.W_j - ||W_j||^2) / gamma
            bias = (log_s - w2 * inv_gamma).unsqueeze(0)
            t = torch.addmm(bias, x, w.t(), alpha=2.0 * inv_gamma)
            if factored:
                near = _at_least(t, rows + (log_s - _NEAR), on_cpu)  # K x 2, K ~ 0
                arg = t[near[:, 0], near[:, 1]] - rows[near[:, 0]]  # log s - d_j / gamma, as below
                hit = near[arg >= log_s]
                out = t.exp_().mul_(_row_factor(x2, inv_gamma).unsqueeze(1))
                out[near[:, 0], near[:, 1]] = arg.clamp_max_(log_s).exp_()
            else:  # log s - d_j / gamma in the exponent
                arg = t.sub_(rows.unsqueeze(1)).clamp_max_(log_s)  # clamp: d_j >= 0
                hit = _at_least(arg, log_s, on_cpu)
                out = arg.exp_()
        ctx.save_for_backward(x, w, out, hit)
        ctx.k = 2.0 * inv_gamma
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        x, w, out, hit = ctx.saved_tensors
        k = ctx.k
        batch, num_classes = out.shape
        with no_autocast(x.device.type):
            grad_x = torch.zeros_like(x)
            row_sum = x.new_zeros(batch, 1)
            grad_w = torch.empty_like(w)
            xk = x * k
            # blocks of classes: G_a never exists in full. One G_a buffer serves every block: a fresh
            # one each time would have its pages faulted in again, which costs as much as filling them
            block = min(class_block(batch, _BLOCK_ELEMENTS), num_classes)
            buffer = out.new_empty(batch * block)
            for c0 in range(0, num_classes, block):
                c1 = min(c0 + block, num_classes)
                cols = slice(c0, c1)
                ga = torch.mul(grad_out[:, cols], out[:, cols], out=buffer[: batch * (c1 - c0)].view(batch, c1 - c0))
                if hit.dtype == torch.bool:
                    ga.masked_fill_(hit[:, cols], 0.0)
                elif hit.numel():
                    here = hit[(hit[:, 1] >= c0) & (hit[:, 1] < c1)]
                    ga[here[:, 0], here[:, 1] - c0] = 0.0
                grad_x.addmm_(ga, w[cols])
                row_sum += ga.sum(dim=1, keepdim=True)
                # the colsum(G_a) W term first, G_a^T x accumulated onto it by the matmul: measured
                # faster than correcting the matmul's output afterwards (~10% of dW's cost at large C)
                dw = torch.mul(w[cols], ga.sum(dim=0).mul_(-k).unsqueeze(1), out=grad_w[cols])
                dw.addmm_(ga.t(), xk)
            grad_x.addcmul_(row_sum, x, value=-1.0).mul_(k)
        return grad_x, grad_w, None, None


def _host_checks(x: Tensor) -> bool:
    """Whether decisions may read values back to the host (CPU: free; an accelerator: a sync)."""
    return x.device.type == "cpu"


def _row_factor(x2: Tensor, inv_gamma: float) -> Tensor:
    """exp(-||x||^2 / gamma) (B)."""
    return torch.exp(-(x2 * inv_gamma))


def _factorable(rows: Tensor, log_s: float) -> bool:
    """Whether exp(t_j) <= s exp(||x||^2 / gamma) and exp(-||x||^2 / gamma) stay finite and normal in
    every row (``rows`` = ||x||^2 / gamma)."""
    top = float(rows.max()) if rows.numel() else 0.0
    return top + max(log_s, 0.0) <= _MAX_EXPONENT


def _at_least(values: Tensor, limit: Tensor | float, on_cpu: bool) -> Tensor:
    """Where ``values`` (B x C) >= ``limit`` (a number, or one per row): on the CPU the K x 2 indices,
    found from one row-max pass (K is ~0: it takes x within rounding of a prototype); elsewhere a
    B x C mask (no host reads)."""
    if isinstance(limit, Tensor):
        limit = limit.unsqueeze(1)
    if not on_cpu:
        return values >= limit
    rows = (values.amax(dim=1, keepdim=True) >= limit).squeeze(1).nonzero().squeeze(1)
    hit = (values[rows] >= (limit[rows] if isinstance(limit, Tensor) else limit)).nonzero()
    hit[:, 0] = rows[hit[:, 0]]
    return hit


class RBFHead(MarginHead):
    """RBF kernel between the feature and each class prototype ``W_j``, scaled by ``s``.

    The same logits serve training and evaluation. Squared distances come from one matrix product,
    ``||x||^2 + ||W_j||^2 - 2 x.W_j`` (clamped at 0), never a B x C x D tensor. That product runs in
    float32 even under autocast: the sum cancels badly when x is close to W_j, and bfloat16 would turn
    a distance of 1 between vectors of norm 10 into noise. Defaults s = 35, gamma = 16 are those of
    every official config (2han9x1a0release/RBF-Softmax); so is the initialisation (``init=official``):
    torch's xavier_uniform, U(+-sqrt(6 / (D + C))).
    """

    # 2han9x1a0release/RBF-Softmax pycls/losses/rbflogit.py: nn.init.xavier_uniform_(self.weight)
    official_init = "xavier_uniform"
    weights_are_points = True  # prototypes in feature space, not directions (heads/probe.py)

    def __init__(self, in_features: int, num_classes: int, s: float = 35.0, gamma: float = 16.0, **common):
        super().__init__(in_features, num_classes, **common)
        self.s = check_float("s", s, low=0.0, low_inclusive=False)
        self.gamma = check_float("gamma", gamma, low=0.0, low_inclusive=False)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        return _RBFLogits.apply(at_least_float32(embeddings), at_least_float32(self.weight), self.s, self.gamma)

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        """x.W_j / (||x|| ||W_j||) of the prototypes (not of its logits), the product in float32 as the logits'."""
        x, w = at_least_float32(embeddings), at_least_float32(self.weight)
        with no_autocast(x.device.type):
            product = torch.mm(x, w.t())
            inv_x = torch.linalg.vecdot(x, x).sqrt_().clamp_min_(1e-12).reciprocal_()
            # (||W_j|| as the squared norms of the logits' bias give it)
            inv_w = torch.linalg.vector_norm(w, dim=1).square_().sqrt_().clamp_min_(1e-12).reciprocal_()
        return scaled_cosine(product, row_scale=inv_x, col_scale=inv_w)
