"""RBF-Softmax (Zhang et al., ECCV 2020): logits s * exp(-||x - W_j||^2 / gamma)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from marginlab.heads.base import MarginHead, at_least_float32, check_float
from marginlab.heads.fast_cosine import LazyCosine, class_block


#: the probe's cosines are recovered from the logits (see _RBFCosine) only where the estimated error
#: of that stays below this (and no logit underflows); otherwise the product x W^T is kept
_RECOVERY_TOLERANCE = 5e-6
#: logits below exp(-this) * s are too close to float32's underflow (exp(-87)) to recover from
_RECOVERY_MAX_EXPONENT = 80.0
#: G_a elements per block of classes in the backward (4 MiB in float32): RBF is held to floor-1 memory
_BLOCK_ELEMENTS = 1 << 20


class _RBFLogits(torch.autograd.Function):
    """``s exp(min(log s - d / gamma, log s))`` with ``d = ||x||^2 + ||W_j||^2 - 2 x.W_j``, fused.

    Forward: one ``addmm`` (the C-vector term rides along as its bias), then in place: the B-vector
    term, the clamp and the ``exp`` (so the logits reuse the product's memory). Backward, with
    ``G_a = G * out`` (zero where clamped) and ``k = 2 / gamma``: ``dx = k (G_a W - rowsum(G_a) x)``,
    ``dW = k (G_a^T x - colsum(G_a) W)``: two matmuls and one C x D pass, block by block over the
    classes, no B x C x D tensor.

    Clamped entries (d computed <= 0: x within rounding of a prototype, rare) get no gradient, as
    ``clamp`` gives: on the CPU one row-max pass lists them, elsewhere (no host reads on an
    accelerator) a B x C boolean mask is kept.

    The probe's cosines need x.W_j. Where the logits give it back precisely enough (CPU only, decided
    from the norms before the product: ``_recoverable``) nothing more is kept; otherwise the product
    x W^T is kept as it is (B x C), as the unfused code did.
    """

    @staticmethod
    def forward(ctx, x, w, s, gamma):
        log_s, inv_gamma = math.log(s), 1.0 / gamma
        with torch.autocast(device_type=x.device.type, enabled=False):
            x2 = torch.linalg.vecdot(x, x)  # B
            w2 = torch.linalg.vector_norm(w, dim=1).square_()  # C, no C x D temporary
            on_cpu = _host_checks(x)
            keep_product = not (on_cpu and _recoverable(x2, w2, gamma, log_s))
            # RBF-Softmax: logit_j = s exp(-d_j / gamma) = exp(log s - d_j / gamma),
            # d_j = ||x||^2 + ||W_j||^2 - 2 x.W_j
            bias = (log_s - w2 * inv_gamma).unsqueeze(0)
            if keep_product:
                product = torch.mm(x, w.t())
                arg = torch.add(bias, product, alpha=2.0 * inv_gamma)
            else:
                product = x.new_zeros(0)
                arg = torch.addmm(bias, x, w.t(), alpha=2.0 * inv_gamma)
            arg.sub_((x2 * inv_gamma).unsqueeze(1)).clamp_max_(log_s)  # clamp: d_j >= 0
            if on_cpu:
                rows = (arg.amax(dim=1) >= log_s).nonzero().squeeze(1)
                clamped = (arg[rows] >= log_s).nonzero()  # K x 2: (index into rows, class)
                clamped[:, 0] = rows[clamped[:, 0]]
            else:
                clamped = arg >= log_s  # B x C bool
            out = arg.exp_()
        ctx.save_for_backward(x, w, out, clamped)
        ctx.k = 2.0 * inv_gamma
        ctx.mark_non_differentiable(product, x2, w2)
        ctx.set_materialize_grads(False)
        return out, product, x2, w2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_product, _grad_x2, _grad_w2):
        x, w, out, clamped = ctx.saved_tensors
        k = ctx.k
        num_classes = w.shape[0]
        if grad_out is None:
            return None, None, None, None
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_x = torch.zeros_like(x)
            row_sum = x.new_zeros(x.shape[0], 1)
            grad_w = torch.empty_like(w)
            xk = x * k
            # blocks of classes: G_a never exists in full, each block of dW is still in cache when
            # its colsum(G_a) W term is added
            block = class_block(x.shape[0], _BLOCK_ELEMENTS)
            for c0 in range(0, num_classes, block):
                c1 = min(c0 + block, num_classes)
                cols = slice(c0, c1)
                ga = grad_out[:, cols] * out[:, cols]
                if clamped.dtype == torch.bool:
                    ga.masked_fill_(clamped[:, cols], 0.0)
                elif clamped.numel():
                    here = clamped[(clamped[:, 1] >= c0) & (clamped[:, 1] < c1)]
                    ga[here[:, 0], here[:, 1] - c0] = 0.0
                grad_x.addmm_(ga, w[cols])
                row_sum += ga.sum(dim=1, keepdim=True)
                dw = grad_w[cols]
                torch.mm(ga.t(), xk, out=dw)
                dw.addcmul_(ga.sum(dim=0).mul_(k).unsqueeze(1), w[cols], value=-1.0)
            grad_x.addcmul_(row_sum, x, value=-1.0).mul_(k)
        return grad_x, grad_w, None, None


def _host_checks(x: Tensor) -> bool:
    """Whether decisions may read values back to the host (CPU: free; an accelerator: a sync)."""
    return x.device.type == "cpu"


def _recoverable(x2: Tensor, w2: Tensor, gamma: float, log_s: float) -> bool:
    """Whether x.W_j can be recovered from the logits to ``_RECOVERY_TOLERANCE`` in the cosine.

    The recovery adds terms of size gamma/2 |log s| and (||x||^2 + ||W_j||^2) / 2 that cancel, so its
    error in the cosine is about eps (gamma/2 |log s| + (||x||^2 + ||W_j||^2)/2) / (||x|| ||W_j||); the
    factor 5 eps (6e-7) bounded it in a sweep over shapes, scales, s and gamma. Zero vectors are exact.
    """
    nx, nw = x2.sqrt(), w2.sqrt()
    nx_max, nw_max = float(nx.max()), float(nw.max())
    if (nx_max + nw_max) ** 2 / gamma - log_s > _RECOVERY_MAX_EXPONENT:
        return False  # some logit may underflow
    if not (bool((nx > 0).any()) and bool((nw > 0).any())):
        return True  # all-zero features or prototypes: every cosine is 0
    nx_min, nw_min = float(nx[nx > 0].min()), float(nw[nw > 0].min())
    ratio = max(nx_max / nw_min, nw_max / nx_min)
    estimate = 6e-7 * (0.5 * gamma * abs(log_s) / (nx_min * nw_min) + 0.5 * (ratio + 1.0 / ratio))
    return estimate <= _RECOVERY_TOLERANCE


class _RBFCosine(LazyCosine):
    """Probe cosines from the logits: x.W_j = gamma/2 (log(logit_j) - log s) + (||x||^2 + ||W_j||^2) / 2,
    used where ``_recoverable`` says that is good to ``_RECOVERY_TOLERANCE`` (the matmul's own
    rounding is ~1e-7)."""

    __slots__ = ("gamma", "log_s", "x2", "w2")

    def __init__(self, logits, x2, w2, gamma, log_s):
        super().__init__(logits)
        self.gamma, self.log_s, self.x2, self.w2 = gamma, log_s, x2, w2

    @torch.no_grad()
    def compute(self):
        if self.raw._version != self.version:
            raise RuntimeError("the head's logits were modified in place after its forward, so its probe "
                               "cosines (last_cosine) can no longer be computed from them")
        xw = torch.log(self.raw).sub_(self.log_s).mul_(0.5 * self.gamma)
        xw.add_((0.5 * self.w2).unsqueeze(0)).add_((0.5 * self.x2).unsqueeze(1))
        # a zero feature or prototype has cosine 0 (x.W_j is recovered only to rounding of the norms)
        inv_x = self.x2.sqrt().clamp_min_(1e-12).reciprocal_().masked_fill_(self.x2 == 0, 0.0)
        inv_w = self.w2.sqrt().clamp_min_(1e-12).reciprocal_().masked_fill_(self.w2 == 0, 0.0)
        return xw.mul_(inv_x.unsqueeze(1)).mul_(inv_w.unsqueeze(0)).clamp_(-1.0, 1.0)


class RBFHead(MarginHead):
    """RBF kernel between the feature and each class prototype ``W_j``, scaled by ``s``.

    The same logits serve training and evaluation. Squared distances come from one matrix product,
    ``||x||^2 + ||W_j||^2 - 2 x.W_j`` (clamped at 0), never a B x C x D tensor. That product runs in
    float32 even under autocast: the sum cancels badly when x is close to W_j, and bfloat16 would turn
    a distance of 1 between vectors of norm 10 into noise. Defaults s = 35, gamma = 16 are those of
    every official config (2han9x1a0release/RBF-Softmax).
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 35.0, gamma: float = 16.0):
        super().__init__(in_features, num_classes)
        self.s = check_float("s", s, low=0.0, low_inclusive=False)
        self.gamma = check_float("gamma", gamma, low=0.0, low_inclusive=False)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        x = at_least_float32(embeddings)
        w = at_least_float32(self.weight)
        out, product, x2, w2 = _RBFLogits.apply(x, w, self.s, self.gamma)
        # cosines for the geometry probe, x.W_j / (||x|| ||W_j||), computed when read
        if product.numel():
            inv_x = x2.sqrt().clamp_min_(1e-12).reciprocal_()
            inv_w = w2.sqrt().clamp_min_(1e-12).reciprocal_()
            self.last_cosine = LazyCosine(product, row_scale=inv_x, col_scale=inv_w)
        else:
            self.last_cosine = _RBFCosine(out, x2, w2, self.gamma, math.log(self.s))
        return out
