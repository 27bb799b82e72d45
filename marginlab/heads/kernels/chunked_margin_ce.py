"""A cosine-margin head's cross-entropy in blocks of classes, without the B x C logits: one autograd Function.

The loss is the mean over the B rows of

    -log softmax_y(l_b),   l_bj = s x^_b . W_j / max(||W_j||, eps),   l_by = s phi(t_b)   (t_b clamped to [-1, 1])

(``x^ = x / max(||x||, FEATURE_EPS)`` as ``normalize_features``, ``phi`` the head's
``margin_and_slope``), which is ``F.cross_entropy`` on the fused head's logits (fused_margin.py). Here the
classes are walked in blocks of ``block`` columns:

- forward: each block's logits (B x block) are computed, the target entries of the rows whose class lies
  in the block overwritten by ``s phi(t)``, and folded into a running row log-sum-exp, the online
  normaliser of Milakov & Gimelshein 2018 ("Online normalizer calculation for softmax"):
  ``lse' = log(e^lse + sum_j e^(l_bj))``, taken as ``logaddexp(lse, logsumexp_j l_bj)`` (each term
  max-shifted, so nothing overflows); the block is then dropped. Only B-element tensors (the log-sum-exp,
  the target logit) and the C class-weight norms (1/B of the logits) outlive a block.
- backward: each block's logits are computed again, ``G_bj = (softmax_bj - [j = y_b]) g / B`` from the
  saved log-sum-exp, the target entries times ``phi'(t_b)``, and the blocked derivative of
  ``x . W_j / ||W_j||`` (fast_cosine.py's module doc) writes that block's rows of dW and adds to dx:

      G' = G / ||W||,   dxs += G' W,   dW_j = G'^T xs - (S_j / ||W_j||) W_j,   S_j = sum_b G'_bj out_bj

  with ``out_by`` the raw (pre-margin) target logit ``s t_b``; the feature normalisation's backward is
  fused_margin.py's ``dx = (g - xs (g . xs) / s^2) s / ||x||``.

The price is one more B x C x D product than the fused head (the logits are made twice), for a peak of
dW (C x D, which every path writes) plus a few B x block temporaries instead of several B x C tensors.

The margin is the head's (``ChunkedMargin``, called once per step with the B target cosines): the target
value phi(t) with its slope in t, and for the heads that also transform the other columns (CurricularFace's
hard negatives, AdaFace's clamp) a function of a B x block cosine block giving h(cos), and h'(cos) when the
backward asks for it (heads/target_margin.py takes both from one autograd expression); the non-target logits
are then ``s h(cos_bj)`` and their gradient is multiplied by h' in the backward. phi may carry autograd
history of its own (MagFace's margin m(||x||)): the Function returns phi's gradient ``s (softmax_by - 1) g / B``,
and autograd takes it on to whatever phi was made from.

With k sub-centres per class (Sub-center ArcFace, ``sub_centers``) a block covers its classes' k weight rows
each and max-pools them; the backward sends each class's gradient to its best row and the target's to the
row t was taken from (the best of the class's k in float64).

A learnt s (a 0-dim tensor, NormFace's) gets ``d loss / d s = mean_b (sum_j p_bj l_bj - l_by) / s``, where
``sum_j p_bj l_bj = lse_b + sum_j p_bj log p_bj`` is summed block by block from the softmax alone.

``labels`` may hold -1 for rows whose class is not among these columns (Partial FC: another rank owns it);
``reduce(tensor, op)`` ("max" or "sum", in place) then combines the row statistics over the ranks, as
Partial FC's ``dist_cross_entropy`` does with its full logits. Autocast: the matmuls run in the autocast
dtype, the rest in float32; float64 stays float64 (gradcheck). Double backward is not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from marginlab.heads.kernels.fast_cosine import (
    NORM_EPS,
    above_floor,
    class_block,
    feature_scale,
    matmul_dtypes,
    no_autocast,
    precise_cosine,
)

#: combines B-element row statistics over ranks in place: ``reduce(tensor, "max" | "sum")``; None: one rank
RowReduce = Callable[[Tensor, str], None]
#: (non-target cosines (B x block, the rows of the batch), whether the slope is wanted) -> (h(cos), dh / dcos or
#: None), both B x block: the forward needs h alone
OtherLogits = Callable[[Tensor, bool], "tuple[Tensor, Tensor | None]"]


@dataclass
class TargetMargin:
    """What a head's chunked margin gives for the B target cosines t (see the module doc)."""

    value: Tensor  #: phi(t) (B); may carry autograd history other than t's (MagFace: the feature norm)
    slope: Tensor | float  #: d phi / d t (B, or one float), without autograd
    others: OtherLogits | None = None  #: the non-target transform h, or None: the plain cosines


#: the head's margin: target cosines (B, detached) -> ``TargetMargin`` or ``(phi, d phi / d t)``
ChunkedMargin = Callable[[Tensor], "TargetMargin | tuple[Tensor, Tensor | float]"]


def _block_logits(xc: Tensor, weight: Tensor, inv: Tensor, c0: int, c1: int, mm_dtype, out_dtype) -> Tensor:
    """The logits s x^ . W_j / ||W_j|| of classes [c0, c1) (B x (c1 - c0)). Unlike the fused head's they are not
    clamped to [-s, s]: the clamp only removes rounding (fast_cosine.py) and costs a pass per block."""
    return torch.mm(xc, weight[c0:c1].to(mm_dtype).t()).to(out_dtype).mul_(inv[c0:c1])


def default_block(batch: int, num_classes: int) -> int:
    """Classes per block: at least 1M elements (B x block, 4 MiB in float32: the matmuls stay efficient), and
    at most 1/16 of the classes beyond that, so the few B x block temporaries stay well under the B x C logits."""
    return max(class_block(batch, 1 << 20), -(-num_classes // 16))


def _put_targets(block: Tensor, labels: Tensor, c0: int, c1: int, values: Tensor) -> None:
    """block[b, y_b - c0] = values[b] for the rows whose class lies in [c0, c1), without a host sync:
    the other rows rewrite one entry of their own with its value (fast_cosine.py's ``_set_targets``)."""
    col = (labels - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)
    inside = (labels >= c0) & (labels < c1)
    block.scatter_(1, col, torch.where(inside, values.to(block.dtype), block.gather(1, col).squeeze(1)).unsqueeze(1))


def _target_cosines(
    x: Tensor, weight: Tensor, rows: Tensor, precise: bool, out_dtype, sub_centers: int
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(t, kept, chosen): the B target cosines clamped to [-1, 1] as the logits are, the clamp's gradient mask
    where t is taken apart from the product (the fused head keeps the slope of a product entry: cos = +-1 is a
    stationary point, its gradient ~0 anyway; None for the product's own values) and the weight row each
    came from: with k sub-centres, the best of the class's k rows (Sub-center ArcFace, max pooling)."""
    if sub_centers > 1:
        k = sub_centers
        candidates = rows.unsqueeze(1) * k + torch.arange(k, device=rows.device)  # B x k: the class's rows
        cos, kept, _ = _target_cosines(
            x.repeat_interleave(k, dim=0), weight, candidates.flatten(), precise, out_dtype, 1
        )
        best, pick = cos.view(-1, k).max(dim=1)
        return (
            best,
            None if kept is None else kept.view(-1, k).gather(1, pick.unsqueeze(1)).squeeze(1),
            candidates.gather(1, pick.unsqueeze(1)).squeeze(1),
        )
    if precise:  # in float64 from the B target rows (fused_margin.py: acos's slope is unbounded at +-1)
        raw = precise_cosine(x, weight, rows).to(out_dtype)
        return raw.clamp(-1.0, 1.0), (raw >= -1.0) & (raw <= 1.0), rows
    # as the product gives it
    xf = x.detach().to(out_dtype)
    xs = xf * feature_scale(torch.linalg.vector_norm(xf, dim=1, keepdim=True))
    w_y = weight.detach()[rows].to(out_dtype)
    raw = torch.linalg.vecdot(xs, w_y) / torch.linalg.vector_norm(w_y, dim=1).clamp_min(NORM_EPS)
    return raw.clamp(-1.0, 1.0), None, rows


class _ChunkedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chosen, k, scale, target_value, slope, t, others, block, reduce, record, out):
        mm_dtype, out_dtype = matmul_dtypes(x, weight)
        s = scale.detach().to(out_dtype) if isinstance(scale, Tensor) else scale  # (a learnt s: a 0-dim tensor)
        num_classes = weight.shape[0] // k
        with no_autocast(x.device.type):
            xf = x.to(out_dtype)
            x_norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
            scale_x = feature_scale(x_norm).mul_(s)  # s / max(||x||, FEATURE_EPS), 0 for a zero feature
            exact = above_floor(x_norm)  # below the floor: a constant scale, no projection in the backward
            xs = xf * scale_x  # s x / ||x||
            xc = xs.to(mm_dtype)
            owned = labels >= 0
            target_logit = (target_value.detach() * s).to(out_dtype)
            # 1 / ||W_j|| (C floats, 1/B of the logits): kept for the backward rather than a second C x D pass
            inv = torch.linalg.vector_norm(weight, dim=1, dtype=out_dtype).clamp_min_(NORM_EPS).reciprocal_()
            lse = nearest = top = predicted = None
            for c0 in range(0, num_classes, block):
                c1 = min(c0 + block, num_classes)
                logits = _block_logits(xc, weight, inv, c0 * k, c1 * k, mm_dtype, out_dtype)
                if k > 1:  # Sub-center ArcFace, max pooling over each class's k sub-centres
                    logits = logits.view(logits.shape[0], c1 - c0, k).amax(dim=2)
                if record is not None:  # the probe's nearest non-target cosine: the target entries out of the max
                    _put_targets(logits, labels, c0, c1, torch.full_like(target_logit, -torch.inf))
                    block_max = logits.amax(dim=1)
                    nearest = block_max if nearest is None else torch.maximum(nearest, block_max)
                if others is not None:  # s h(cos): the head's non-target transform
                    logits = others(logits.div_(s), False)[0].mul_(s)
                _put_targets(logits, labels, c0, c1, target_logit)
                block_top, block_arg = logits.max(dim=1)  # (the logits are finite: s cos, clamped)
                if out is not None:  # the argmax of the training logits (ties: the first column, as torch.argmax)
                    if top is None:
                        top, predicted = block_top, block_arg
                    else:
                        better = block_top > top
                        top = torch.where(better, block_top, top)
                        predicted = torch.where(better, block_arg + c0, predicted)
                # online log-sum-exp (Milakov & Gimelshein 2018), as the running (max, sum) pair folded into one
                # value: lse' = log(e^lse + sum_j e^(l_j)); each block's own is shifted by its max, in place
                block_lse = logits.sub_(block_top.unsqueeze(1)).exp_().sum(dim=1).log_().add_(block_top)
                lse = block_lse if lse is None else torch.logaddexp(lse, block_lse)
                del logits  # before the next block's is made: one B x block tensor at a time, not two
            own_target = target_logit * owned
            if reduce is not None:  # the other ranks' columns: global max, rescaled sums, the owner's target
                top = lse.clone()
                reduce(top, "max")
                total = (lse - top).exp_()
                reduce(total, "sum")
                lse = total.log_().add_(top)
                reduce(own_target, "sum")
            loss = (lse - own_target).mean()  # -log softmax_y = lse - l_y
            if record is not None:
                record["nearest_other"] = (nearest / s).clamp_(-1.0, 1.0)
            if out is not None:
                out["predicted"] = predicted
        ctx.k, ctx.s, ctx.block, ctx.others = k, s, block, others
        ctx.dtypes, ctx.x_dtype = (mm_dtype, out_dtype), x.dtype
        ctx.value_dtype = target_value.dtype
        ctx.scale_dtype = scale.dtype if isinstance(scale, Tensor) else None
        ctx.scalar_slope = None if isinstance(slope, Tensor) else float(slope)
        ctx.save_for_backward(
            xs,
            xc,
            weight,
            inv,
            scale_x,
            exact,
            labels,
            chosen,
            lse,
            target_logit,
            t * s,
            slope if isinstance(slope, Tensor) else None,
        )
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        xs, xc, weight, inv, scale_x, exact, labels, chosen, lse, target_logit, raw_target, slope = ctx.saved_tensors
        mm_dtype, out_dtype = ctx.dtypes
        k, s, block, others = ctx.k, ctx.s, ctx.block, ctx.others
        batch, num_classes = xs.shape[0], weight.shape[0] // k
        inv_target = inv[chosen.clamp_min(0)]  # 1 / ||W_y|| (the chosen sub-centre's)
        with no_autocast(xs.device.type):
            g = grad_loss.to(out_dtype) / batch  # d mean / d loss_b
            # d loss / d (s phi_b) = (softmax_by - 1) g / B on the rows whose class is among these columns
            grad_target = (target_logit - lse).exp_().sub_(1.0).mul_(g).mul_(labels >= 0)
            grad_value = grad_target * s if ctx.needs_input_grad[6] else None
            sum_p_log_p = torch.zeros_like(lse) if ctx.needs_input_grad[5] else None
            slope = (slope if slope is not None else ctx.scalar_slope) * g  # d loss / d (s t_b) per unit (p_by - 1)
            grad_xs = torch.zeros(xs.shape, dtype=out_dtype, device=xs.device)
            grad_w = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
            lse_col, raw_target = lse.unsqueeze(1).neg(), raw_target / inv_target  # (s t ||W_y||)
            for c0 in range(0, num_classes, block):
                c1 = min(c0 + block, num_classes)
                r0, r1 = c0 * k, c1 * k  # the block's weight rows
                w_b, inv_b = weight[r0:r1], inv[r0:r1]
                wc_b = w_b.to(mm_dtype)
                raw = torch.mm(xc, wc_b.t()).to(out_dtype)  # xs . W_j: the logits times ||W_j||
                if k > 1:  # the best sub-centre of each class (Sub-center ArcFace, max pooling) and where it is
                    logits, best = (raw * inv_b).view(batch, c1 - c0, k).max(dim=2)
                else:
                    logits, best = None, None
                if others is None:  # softmax of the margin logits (the target entries hold s phi(t)): e^(l_bj - lse_b)
                    grad = torch.addcmul(lse_col, raw, inv_b) if k == 1 else logits.add_(lse_col)
                    other_slope = None
                else:  # the logits s h(cos) and h'(cos) of the head's transform
                    value, other_slope = others(raw * (inv_b / s) if k == 1 else logits.div_(s), True)
                    grad = value.mul_(s).add_(lse_col)
                _put_targets(grad, labels, c0, c1, target_logit - lse)
                grad.exp_()
                if sum_p_log_p is not None:  # sum_j p_bj log p_bj, for d loss / d s
                    sum_p_log_p += torch.xlogy(grad, grad).sum(dim=1)
                # d CE / d l_bj = (softmax_bj - [j = y_b]) g / B; at the target entries times d phi / d t
                col = (labels - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)
                g_target = (grad.gather(1, col).squeeze(1) - 1.0).mul_(slope).mul_(inv_target)
                if other_slope is not None:
                    grad.mul_(other_slope)
                if k > 1:  # each class's gradient to its best sub-centre; the target's to the chosen one, below
                    _put_targets(grad.mul_(g), labels, c0, c1, torch.zeros_like(g_target))
                    grad = torch.zeros(batch, c1 - c0, k, dtype=out_dtype, device=xs.device).scatter_(
                        2, best.unsqueeze(2), grad.unsqueeze(2)
                    )
                    grad = grad.view(batch, r1 - r0).mul_(inv_b)  # G' = G / ||W||
                else:
                    grad.mul_(inv_b * g)  # G' = G / ||W||
                _put_targets(grad, chosen, r0, r1, g_target)
                gc = grad.to(mm_dtype)
                dw = grad_w[r0:r1]
                if mm_dtype == out_dtype:
                    grad_xs.addmm_(gc, wc_b)
                    torch.mm(gc.t(), xc, out=dw)
                else:
                    grad_xs.add_(torch.mm(gc, wc_b))
                    dw.copy_(torch.mm(gc.t(), xc))
                # S_j = sum_b G'_bj out_bj = (sum_b G'_bj raw_bj) / ||W_j||, the target entries at their raw
                # value s t (fast_cosine.py); dW_j -= S_j W_j / ||W_j||
                _put_targets(raw, chosen, r0, r1, raw_target)
                weight_norm_term = grad.mul_(raw).sum(dim=0).mul_(inv_b.square())
                dw.addcmul_(weight_norm_term.unsqueeze(1), w_b, value=-1.0)
                del raw, grad, gc, logits  # before the next block's are made
            # xs = x s / ||x||: dx = (g - xs (g . xs) / s^2) s / ||x|| (fused_margin.py)
            along = torch.linalg.vecdot(grad_xs, xs).unsqueeze(1).mul_(exact)
            grad_x = grad_xs.addcmul_(xs, along, value=-1.0 / s**2).mul_(scale_x)
            grad_scale = None
            if sum_p_log_p is not None:  # a learnt s: d loss_b / d s = (sum_j p_bj l_bj - l_by) / s, with
                # sum_j p_bj l_bj = sum_j p_bj (log p_bj + lse_b) = sum_j p_bj log p_bj + lse_b
                grad_scale = ((sum_p_log_p + lse - target_logit).sum() * g / s).to(ctx.scale_dtype)
        if grad_value is not None:
            grad_value = grad_value.to(ctx.value_dtype)
        grads = (grad_x.to(ctx.x_dtype), grad_w.to(weight.dtype), None, None, None, grad_scale, grad_value)
        return grads + (None,) * 7


def chunked_margin_cross_entropy(
    x: Tensor,
    weight: Tensor,
    labels: Tensor,
    s: float | Tensor,
    margin: ChunkedMargin,
    precise: bool = True,
    block: int | None = None,
    reduce: RowReduce | None = None,
    sub_centers: int = 1,
    record: dict | None = None,
    return_predicted: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mean cross-entropy of a cosine-margin head's training logits, never holding them (see the module doc).

    ``x``: raw features (B x D); ``weight``: class weights (C x D); ``labels``: class indices (B), -1 for a
    row whose class another rank holds; ``s``: the scale, a float or a learnt 0-dim tensor (it gets its
    gradient); ``margin``: the head's margin on the target cosines (its
    ``margin_and_slope``, or a ``ChunkedMargin`` giving a ``TargetMargin``); ``block``: classes per block
    (default: ``default_block``); ``precise``: the target cosines in float64 from the target rows (the head's
    ``precise_target``); ``sub_centers``: k weight rows per class (rows ``c k .. c k + k - 1``), each class's
    cosine the best of its k (Sub-center ArcFace); ``block`` then counts classes, of k rows each. ``record``: a
    dict that receives the geometry probe's B-vectors, ``target`` (cos theta_y) and ``nearest_other`` (the
    largest non-target cosine, one max per block), detached; one rank only. ``return_predicted``: also return
    each row's predicted class, the argmax of the training logits (one max per block; one rank only), for the
    training accuracy.
    """
    k = int(sub_centers)
    if isinstance(s, Tensor) and s.requires_grad and reduce is not None:
        raise ValueError("chunked_margin_cross_entropy: a learnt s over several ranks is not supported; pass a float")
    if (record is not None or return_predicted) and reduce is not None:
        raise ValueError(
            "chunked_margin_cross_entropy: record= and return_predicted= need every class on this rank (reduce=None)"
        )
    if block is None:
        block = max(1, default_block(x.shape[0], weight.shape[0]) // k)
    labels = labels.long()
    rows = labels.clamp_min(0)
    out_dtype = matmul_dtypes(x, weight)[1]
    with no_autocast(x.device.type):
        t, kept, chosen = _target_cosines(x, weight, rows, bool(precise), out_dtype, k)
        result = margin(t)
    if not isinstance(result, TargetMargin):
        result = TargetMargin(*result)
    if record is not None:
        record["target"] = t
    slope = result.slope.detach() if isinstance(result.slope, Tensor) else result.slope
    if kept is not None:  # (a float slope becomes a tensor here: out_dtype)
        slope = kept.to(out_dtype).mul_(slope)
    out = {} if return_predicted else None
    loss = _ChunkedMarginCE.apply(
        x,
        weight,
        torch.where(labels >= 0, rows, -1),
        torch.where(labels >= 0, chosen, -1),
        k,
        s if isinstance(s, Tensor) else float(s),
        result.value,
        slope,
        t,
        result.others,
        int(block),
        reduce,
        record,
        out,
    )
    return (loss, out["predicted"]) if return_predicted else loss
