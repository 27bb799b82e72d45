"""Fused logits for the heads: ``x W^T`` (optionally divided by the class-weight norms) in one custom
autograd Function, with exact gradients and without materialising ``normalize(W)``.

Why: ``F.linear(F.normalize(x), F.normalize(W))`` writes a normalised copy of W (C x D) every step
and its backward runs several more C x D passes through ``normalize``; at C = 85,742 that is 2.4x the
cost of a plain linear layer. Here the B x C product is taken with the raw W and its columns are
divided by the C norms, ``cos_bj = x_b . W_j / ||W_j||`` (x is normalised, and scaled by s, by the
caller: B x D, cheap). The backward is written out:

    G' = G / ||W||                            (B x C, one pass)
    dx = G' W                                 (matmul)
    dW = G'^T x - (S_j / ||W_j||) W_j,  S_j = sum_b G'_bj out_bj       (matmul, one C x D pass)

which is the exact derivative of x . W_j / max(||W_j||, eps) (the norm's own gradient is dropped
where ||W_j|| < eps, as ``F.normalize``'s clamp does). It runs in blocks of classes, so G' never
exists in full and each block of dW is still in cache for its correction. ``S`` is read off the
forward output (B x C) rather than from the C x D matrices; if that output was modified in place in
a way the head did not declare (see ``FusedLogits.replace_target``),
``S_j = W_j . (G'^T x)_j / ||W_j||`` is used instead: slower, equally exact.

The target entries are recomputed in float64 from the B target rows (B x D, negligible): margin
heads take acos of them, whose slope is unbounded at cos = +-1, where the matmul's float32 rounding
would move the angle by up to ~3.5e-4 rad. Their gradient is the same formula as the other entries'.

Margin heads overwrite the target column of the logits in place. The Function therefore also returns
the B target entries (``target``) and the B target-row norms ``||W_y||`` (``target_norm``) as outputs
of their own; their gradients are folded into the matmuls (normalised: written into G') or into B
rows of dW, so no head builds a dense C x D gradient for ``W[labels]``. The replacement itself
(``replace_target``) passes the B x C gradient through untouched (an autograd ``scatter_`` would
copy it to zero B entries); the fused backward then sets the B target entries of G' to their own
gradient before the matmuls (unnormalised: adds the difference in B rows).

The clamp to [-bound, bound] (cosines to [-1, 1], or s cos to [-s, s]) only removes rounding; the
gradient of the target entries is zeroed where they were clamped (as ``clamp``'s is), the other
entries pass their gradient (there the true gradient is ~0 anyway: cos = +-1 is a stationary point).

Autocast: the two matmuls run in the autocast dtype (bfloat16/float16) as ``F.linear`` would, the
rest in float32; float64 stays float64 (gradcheck). Double backward is not supported.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

#: F.normalize's eps: ||W_j|| is floored here before dividing; a feature below it is a zero feature
NORM_EPS = 1e-12
#: the feature-norm floor of every head that normalises features: x / max(||x||, FEATURE_EPS), as
#: F.normalize does with its eps, in the forward and the backward alike, so a near-zero feature
#: (||x|| < FEATURE_EPS) gets a gradient of at most ||G|| / FEATURE_EPS (F.normalize's 1e-12 gives
#: ~1e11 G at ||x|| = 1e-11). 1e-3 is AdaFace's norm floor (mk-minchul/AdaFace head.py:
#: ``torch.clip(norms, min=0.001, max=100)``); features of a trained backbone are orders larger.
FEATURE_EPS = 1e-3
#: elements of G' per block of classes in the backward (B x block, 16 MiB in float32)
BLOCK_ELEMENTS = 1 << 22


def class_block(batch: int, elements: int | None = None) -> int:
    """Classes per block in the blocked backwards (here and in heads/rbf.py): ``elements`` per block."""
    elements = BLOCK_ELEMENTS if elements is None else elements
    return max(1, elements // max(1, batch))


def no_autocast(device_type: str):
    """Autocast off inside a fused Function (it picks the matmul dtype itself); a no-op when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def matmul_dtypes(x: Tensor, weight: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(matmul dtype, output dtype): the autocast dtype where autocast applies, float32 at least out."""
    dev = x.device.type
    floating = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype in floating and weight.dtype in floating and torch.is_autocast_enabled(dev):
        mm = torch.get_autocast_dtype(dev)
    else:
        mm = torch.promote_types(x.dtype, weight.dtype)
    return mm, torch.promote_types(mm, torch.float32)


def _precise_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64


def above_floor(norm: Tensor) -> Tensor:
    """Where a feature is normalised exactly (value and gradient of x / ||x||): ||x|| >= FEATURE_EPS. The
    one rule of the floor, for the autograd path (``feature_scale``) and the fused and chunked backwards
    alike; at ||x|| = FEATURE_EPS exactly it keeps the radial projection (clamp_min's gradient would not)."""
    return norm >= FEATURE_EPS


def feature_scale(norm: Tensor) -> Tensor:
    """1 / max(||x||, FEATURE_EPS) per row, and 0 for a zero feature (||x|| < NORM_EPS, no direction:
    no gradient either). Below the floor (``above_floor`` false) it is the constant 1 / FEATURE_EPS, so x
    times it has the bounded gradient G / FEATURE_EPS, as ``F.normalize`` with that eps; elsewhere exact."""
    # where, not clamp_min: the floor's rule is ``above_floor``'s at ||x|| = FEATURE_EPS too (the value is
    # the same; the reciprocal is of the floored norm, so no inf meets the mask)
    return torch.where(above_floor(norm), norm, FEATURE_EPS).reciprocal() * (norm >= NORM_EPS)


@torch.no_grad()
def unfloor_ratio(norm: Tensor) -> Tensor:
    """max(||x||, FEATURE_EPS) / ||x|| per row: what turns a cosine of the floored feature x / max(||x||,
    FEATURE_EPS) into that of x / ||x|| (1 at and above the floor, ``above_floor``; 1 for a zero feature,
    whose cosines are 0 either way). The probe's cosines take it (heads/probe.py)."""
    # (the division by a zero norm is in the branch where does not take)
    return torch.where(above_floor(norm) | (norm < NORM_EPS), 1.0, FEATURE_EPS / norm)


def normalize_features(x: Tensor) -> Tensor:
    """x / max(||x||, FEATURE_EPS) row by row, like ``F.normalize`` with eps = FEATURE_EPS, except that
    a zero feature (||x|| < NORM_EPS) maps to 0 with a zero gradient. With F.normalize's own eps (1e-12)
    a feature of norm 1e-11 would pass back ~1e11 times the gradient and blow up the step; here any
    feature's gradient is at most ||G|| / FEATURE_EPS. Above FEATURE_EPS value and gradient are exact.
    Plain autograd ops (torch.compile traces them); the clamp and the mask cost B elements."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)  # its gradient at 0 is 0
    return x * feature_scale(norm)


@torch.no_grad()
def precise_cosine(embeddings: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """cos(theta_y) = x/max(||x||, FEATURE_EPS) . W_y/max(||W_y||, eps) for the B target rows, in
    float64; 0 for a zero feature, as ``normalize_features`` gives."""
    hi = _precise_dtype(embeddings)
    x, w_y = embeddings.detach().to(hi), weight.detach()[labels.long()].to(hi)
    dot = torch.linalg.vecdot(x, w_y)
    nx = torch.linalg.vector_norm(x, dim=1)
    cos = dot / (nx.clamp_min(FEATURE_EPS) * torch.linalg.vector_norm(w_y, dim=1).clamp_min(NORM_EPS))
    return cos.mul_(nx >= NORM_EPS)


class _Handle:
    """Shared between a forward and its backward: the output's version once the head is done with it,
    and whether its target entries were overwritten through ``FusedLogits.replace_target``."""

    __slots__ = ("expected_version", "replaced")

    def __init__(self):
        self.expected_version = -1
        self.replaced = False


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, normalize, bound, target_value, handle):
        mm_dtype, out_dtype = matmul_dtypes(x, weight)
        dev = x.device.type
        with no_autocast(dev):
            xc, wc = x.to(mm_dtype), weight.to(mm_dtype)
            out = torch.mm(xc, wc.t()).to(out_dtype)
            # the C norms only where the product is divided by them (a C x D pass); else the B target rows'
            norms = torch.linalg.vector_norm(weight, dim=1, dtype=out_dtype) if normalize else out.new_zeros(0)
            inv = norms.clamp_min(NORM_EPS).reciprocal_() if normalize else None
            if normalize:
                out.mul_(inv)
            if labels is not None:
                # the B target entries again, in float64 from the rows (B x D, cheap): margins take
                # acos of them, whose slope is unbounded at +-1, so rounding there would move the angle
                if target_value is None:
                    hi = _precise_dtype(x)
                    w_y = weight[labels]
                    # products of float32 entries are exact in float64: x is widened once (a copy, as
                    # it is multiplied in place), W_y element by element inside the product
                    target_value = x.to(hi, copy=True).mul_(w_y).sum(dim=1)
                    if normalize:
                        target_value = target_value / torch.linalg.vector_norm(w_y.to(hi), dim=1).clamp_min(NORM_EPS)
                raw_target = target_value.to(out_dtype)  # before the clamp
                target_norm = (
                    norms[labels] if normalize else torch.linalg.vector_norm(weight[labels], dim=1, dtype=out_dtype)
                )
            else:
                raw_target = target_norm = out.new_zeros(0)
            if bound is not None:
                out.clamp_(-bound, bound)
                target = raw_target.clamp(-bound, bound)
                target_kept = (raw_target >= -bound) & (raw_target <= bound)  # clamp's gradient mask
            else:
                target, target_kept = raw_target, None
        handle.expected_version = out._version
        ctx.handle = handle
        ctx.out = out.detach()  # alias: same storage and version counter, no reference cycle
        ctx.normalize = normalize
        ctx.dtypes = (mm_dtype, out_dtype)
        ctx.has_labels = labels is not None
        ctx.save_for_backward(x, xc, weight, wc, target_norm, inv, labels, raw_target, target_kept)
        ctx.mark_non_differentiable(norms)
        ctx.set_materialize_grads(False)  # unused outputs: None, not B x C zeros
        return out, target, target_norm, norms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_target, grad_target_norm, _grad_norms):
        x, xc, weight, wc, target_norm, inv, labels, raw_target, target_kept = ctx.saved_tensors
        mm_dtype, out_dtype = ctx.dtypes
        out = ctx.out
        # S_j from the output (B x C) unless it was edited in place by someone other than the head
        out_intact = out._version == ctx.handle.expected_version
        replaced = ctx.handle.replaced
        batch = x.shape[0]
        with no_autocast(x.device.type):
            if grad_out is None:
                grad_out = out.new_zeros(out.shape)
            targets = ctx.has_labels and labels.numel() > 0 and (grad_target is not None or replaced)
            if targets:
                # d loss / d entry (b, y_b): grad_target (through the clamp) plus, unless the head
                # replaced the entry (then G_by is the replacement's and is not passed on), G_by
                idx = labels.view(-1, 1)
                g_by = grad_out.gather(1, idx).squeeze(1).to(out_dtype)
                gt = raw_target.new_zeros(batch) if grad_target is None else grad_target.to(out_dtype)
                if target_kept is not None:
                    gt = gt * target_kept
                if not replaced:
                    gt = gt + g_by
            w_y = rows = None  # updates of the B rows W_y of dW, summed first: one gather, one scatter-add
            if ctx.normalize:
                grad_x, grad_w = normalized_backward(
                    grad_out,
                    x,
                    xc,
                    weight,
                    wc,
                    inv,
                    out,
                    out_intact,
                    labels if targets else None,
                    gt * inv[labels] if targets else None,
                    raw_target,
                    mm_dtype,
                    out_dtype,
                )
            else:
                gc = grad_out.to(mm_dtype)
                grad_x = torch.mm(gc, wc).to(out_dtype)
                grad_w = torch.mm(gc.t(), xc).to(out_dtype)
                if targets:  # the entries' gradient is gt, the matmuls passed G_by: add the difference
                    corr = (gt - g_by).unsqueeze(1)
                    w_y = weight[labels].to(out_dtype)
                    grad_x.addcmul_(corr, w_y)
                    rows = corr * x.to(out_dtype)
            if ctx.has_labels and labels.numel() and grad_target_norm is not None:
                # d||W_y|| / dW_y = W_y / ||W_y|| (0 at W_y = 0): B rows
                coef = (grad_target_norm.to(out_dtype) / target_norm.clamp_min(NORM_EPS)).unsqueeze(1)
                w_y = weight[labels].to(out_dtype) if w_y is None else w_y
                rows = coef * w_y if rows is None else rows.addcmul_(coef, w_y)
            if rows is not None:
                grad_w.index_put_((labels,), rows, accumulate=True)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None, None, None, None, None


def normalized_backward(
    grad_out, x, xc, weight, wc, inv, out, out_intact, labels, g_target, raw_target, mm_dtype, out_dtype
):
    """dx, dW of out = x W^T / ||W||, in blocks of classes (see the module doc).

    ``g_target`` (B): G' (= G / ||W_y||) to use at the entries (b, y_b) instead of what ``grad_out``
    holds there, whose value for S is ``raw_target``; both are written into each block (B entries),
    so no B x D row updates are needed.
    """
    batch, num_classes = grad_out.shape
    block = class_block(batch)
    whole = num_classes <= block  # one block: the full tensors, no slices or accumulation buffers
    grad_x = None if whole else torch.zeros(x.shape, dtype=out_dtype, device=x.device)
    grad_w = None if whole else torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    for c0 in range(0, num_classes, block):
        c1 = min(c0 + block, num_classes)
        cols = slice(c0, c1)
        g_in, inv_b, w_b, wc_b = (
            (grad_out, inv, weight, wc) if whole else (grad_out[:, cols], inv[cols], weight[cols], wc[cols])
        )
        g = torch.mul(g_in, inv_b)  # G' = G / ||W||
        if labels is not None:
            _set_targets(g, labels, c0, c1, g_target, whole)
        gc = g.to(mm_dtype)
        if whole:
            grad_x, grad_w = torch.mm(gc, wc).to(out_dtype), torch.mm(gc.t(), xc).to(out_dtype)
            dw = grad_w
        elif mm_dtype == out_dtype:
            dw = grad_w[cols]
            grad_x.addmm_(gc, wc_b)
            torch.mm(gc.t(), xc, out=dw)
        else:
            dw = grad_w[cols]
            grad_x.add_(torch.mm(gc, wc_b))
            dw.copy_(torch.mm(gc.t(), xc))
        if out_intact:  # S_j = sum_b G'_bj out_bj, the target entries at their own value (G' is done:
            g.mul_(out if whole else out[:, cols])  # its memory takes the products)
            if labels is not None:
                _set_targets(g, labels, c0, c1, g_target * raw_target, whole)
            s = g.sum(dim=0)
        else:  # S_j = W_j . (G'^T x)_j / ||W_j||
            s = torch.linalg.vecdot(w_b.to(out_dtype), dw).mul_(inv_b)
        dw.addcmul_(s.mul_(inv_b).unsqueeze(1), w_b, value=-1.0)
    return grad_x, grad_w


def _set_targets(block: Tensor, labels: Tensor, c0: int, c1: int, values: Tensor, whole: bool) -> None:
    """block[b, y_b - c0] = values[b] for the samples whose class lies in [c0, c1) (all of them when
    ``whole``), without a host sync: the others rewrite an entry of their row with its own value."""
    values = values.to(block.dtype)
    if whole:
        block.scatter_(1, labels.unsqueeze(1), values.unsqueeze(1))
        return
    col = (labels - c0).clamp_(0, c1 - c0 - 1).unsqueeze(1)
    inside = (labels >= c0) & (labels < c1)
    block.scatter_(1, col, torch.where(inside, values, block.gather(1, col).squeeze(1)).unsqueeze(1))


class _ReplaceTarget(torch.autograd.Function):
    """logits[b, y_b] = value_b in place; the gradient goes to the logits unchanged (see the fused
    backward, which knows these entries were replaced) and, gathered, to the values."""

    @staticmethod
    def forward(ctx, logits, labels, value, handle):
        idx = labels.view(-1, 1)
        logits.scatter_(1, idx, value.detach().view(-1, 1).to(logits.dtype))
        handle.replaced = True
        ctx.mark_dirty(logits)
        ctx.save_for_backward(idx)
        ctx.value_dtype = value.dtype
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad, None, grad.gather(1, idx).squeeze(1).to(ctx.value_dtype), None


def _plain_linear(
    x: Tensor, weight: Tensor, labels: Tensor | None, normalize_weight: bool, bound: float | Tensor | None
) -> "FusedLogits":
    """The same values as ``fused_linear`` from ordinary autograd ops (what torch.compile traces and fuses)."""
    out = torch.nn.functional.linear(x, weight)
    out = out.to(torch.promote_types(out.dtype, torch.float32))
    norms = torch.linalg.vector_norm(weight, dim=1, dtype=out.dtype).clamp_min(NORM_EPS)
    if normalize_weight:
        out = out / norms
    target = target_norm = None
    if labels is not None:
        target, target_norm = out.gather(1, labels.view(-1, 1)).squeeze(1), norms[labels]
    if bound is not None:
        out = out.clamp(-bound, bound)
        target = None if target is None else target.clamp(-bound, bound)
    return FusedLogits(out, target, target_norm, norms.detach() if normalize_weight else None, None)


class FusedLogits(NamedTuple):
    """What ``fused_linear`` returns. ``logits`` (B x C) may be edited in place only through
    ``replace_target``; ``target`` (B) are its entries at the labels before any replacement and
    ``target_norm`` (B) the norms ||W_y|| (both differentiable); ``weight_norms`` (C, detached) are
    the class-weight norms where the product was divided by them, else None."""

    logits: Tensor
    target: Tensor | None
    target_norm: Tensor | None
    weight_norms: Tensor | None
    handle: _Handle | None  # None: the plain path of ``_plain_linear``

    def replace_target(self, labels: Tensor, target_logit: Tensor) -> Tensor:
        """Writes ``target_logit`` (B) into the target column of ``logits`` in place; returns logits.

        ``labels`` must be the labels given to ``fused_linear``. Unlike an autograd ``scatter_``, whose
        backward copies the B x C gradient to zero the B overwritten entries, the gradient passes
        through as is and the fused backward overrides those B entries.
        """
        if self.handle is None:  # the plain path (under torch.compile): an ordinary out-of-place scatter
            return self.logits.scatter(1, labels.long().view(-1, 1), target_logit.view(-1, 1).to(self.logits.dtype))
        if self.handle.replaced:
            raise RuntimeError("replace_target may be called once per forward")
        logits = _ReplaceTarget.apply(self.logits, labels.long(), target_logit, self.handle)
        self.handle.expected_version = logits._version
        return logits


def fused_linear(
    x: Tensor,
    weight: Tensor,
    labels: Tensor | None = None,
    *,
    normalize_weight: bool = False,
    bound: float | Tensor | None = None,
    target_value: Tensor | None = None,
) -> FusedLogits:
    """``x W^T`` (B x C), divided column-wise by ``max(||W_j||, eps)`` when ``normalize_weight``,
    clamped to ``[-bound, bound]`` when ``bound`` is given; at least float32 (see the module doc).

    ``target_value`` (B, no gradient): the value of the target entries before the clamp, when the
    caller can compute it more precisely than from ``x`` (e.g. from the un-normalised features);
    by default it is computed in float64 from ``x`` and the target rows of ``weight``.
    """
    if labels is not None:
        labels = labels.long()
    if torch.compiler.is_compiling():  # dynamo cannot trace the fused Function's version bookkeeping
        return _plain_linear(x, weight, labels, normalize_weight, bound)
    handle = _Handle()
    out, target, target_norm, norms = _FusedLinear.apply(
        x, weight, labels, normalize_weight, bound, target_value, handle
    )
    if labels is None:
        target = target_norm = None
    return FusedLogits(out, target, target_norm, norms if normalize_weight else None, handle)
