"""A cosine-margin head's whole training forward in one autograd Function, with its exact backward.

The head gives its margin as a function of the B target cosines that returns the new target cosine
and its slope, ``phi(t), d phi / d t`` (``CosineMarginHead.margin_and_slope``). The Function then
computes, without recording any autograd op:

    x^ = x / max(||x||, eps)                     (B x D; F.normalize)
    logits_bj = s x^_b . W_j / max(||W_j||, eps)  clamped to [-bound, bound]   (fast_cosine.py)
    logits_by = s phi(t_b)                        (the B target entries, overwritten)

and the backward by hand: the B target entries of the incoming gradient are multiplied by the
slope, the matmuls and the weight-norm term are fast_cosine.py's blocked backward, and the feature
normalisation's backward is ``dx = (g - xs (g . xs) / s^2) s / ||x||`` with ``xs = s x^``. As
``normalize_features`` (fast_cosine.py) gives: a zero feature gets x^ = 0 and dx = 0; a near-zero one
(||x|| < FEATURE_EPS) x^ = x / FEATURE_EPS and dx = g s / FEATURE_EPS, bounded (F.normalize's eps of
1e-12 would pass back ~1e11 times the gradient at ||x|| = 1e-11). The weight-norm term
S_j is read off the logits (B x C) or, when D <= B, off W and dW (C x D, the smaller read, and it
needs no target values: with a slope of 1 the target entries need no fix-up at all).

Why: in a chain of autograd ops (normalize, the fused product, a margin of a few B-element ops, the
in-place replacement) every op costs a few microseconds of dispatch and bookkeeping forward and
again backward. At small shapes, e.g. the 2-D features of the MNIST visualisations, that overhead
is the whole cost of the head; here it is about one op per line above. At large shapes nothing
changes: the B x C and C x D work is fast_cosine.py's.

The target cosine ``t`` is clamped to the same bound as the logits (its slope is zeroed where the
clamp acts). Heads whose margin is angular take ``t`` in float64 from the B target rows
(``precise_cosine``): acos's slope is unbounded at +-1, where the float32 product would move the
angle by up to ~3.5e-4 rad. Additive cosine margins (slope 1) take it from the product.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from marginlab.heads.kernels.fast_cosine import (
    NORM_EPS,
    above_floor,
    feature_scale,
    matmul_dtypes,
    no_autocast,
    normalized_backward,
    precise_cosine,
)

#: the head's margin: target cosines (B) -> (phi (B), d phi / d t (B tensor or float))
MarginAndSlope = Callable[[Tensor], "tuple[Tensor, Tensor | float]"]


class _FusedCosineMargin(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, s, bound, margin_and_slope, precise):
        mm_dtype, out_dtype = matmul_dtypes(x, weight)
        with no_autocast(x.device.type):
            xf = x.to(out_dtype)
            x_norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
            # s / max(||x||, FEATURE_EPS), and 0 for a zero feature: x^ = 0 and no gradient (normalize_features)
            scale_x = feature_scale(x_norm).mul_(s)
            exact = above_floor(x_norm)  # below the floor x^ = x / FEATURE_EPS: no projection in the backward
            xs = xf * scale_x  # s x / ||x||
            xc, wc = xs.to(mm_dtype), weight.to(mm_dtype)
            inv = torch.linalg.vector_norm(weight, dim=1, dtype=out_dtype).clamp_min_(NORM_EPS).reciprocal_()
            out = torch.mm(xc, wc.t()).to(out_dtype).mul_(inv).clamp_(-bound, bound)
            idx = labels.view(-1, 1)
            limit = bound / s  # the clamp on the cosines
            # t: the target cosines; target = s t, the target logits before the margin (for the
            # backward and the probe)
            if precise:
                raw = precise_cosine(x, weight, labels).to(out_dtype)
                kept = (raw >= -limit) & (raw <= limit)  # clamp's gradient mask
                t = raw.clamp(-limit, limit)
                target = t * s
            else:  # from the product, clamped with it; a clamped entry keeps its slope (cos = +-1 is a
                target = out.gather(1, idx).squeeze(1)  # stationary point: its gradient is ~0 anyway)
                t, kept = target / s, None
            value, slope = margin_and_slope(t)
            ctx.replaced = value is not t  # (the identity margin has nothing to write)
            if ctx.replaced:
                out.scatter_(1, idx, (value * s).to(out_dtype).unsqueeze(1))
        ctx.out, ctx.version = out.detach(), out._version  # alias: same storage, no reference cycle
        ctx.s, ctx.dtypes, ctx.x_dtype = s, (mm_dtype, out_dtype), x.dtype
        slope = slope * kept if kept is not None else slope
        ctx.scalar_slope = None if isinstance(slope, Tensor) else float(slope)
        ctx.save_for_backward(
            xs, xc, weight, wc, inv, scale_x, exact, labels, target, slope if isinstance(slope, Tensor) else None
        )
        ctx.mark_non_differentiable(target)
        ctx.set_materialize_grads(False)
        return out, target

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_target):
        xs, xc, weight, wc, inv, scale_x, exact, labels, target, slope = ctx.saved_tensors
        mm_dtype, out_dtype = ctx.dtypes
        if grad_out is None:
            return None, None, None, None, None, None, None
        batch, dim = xs.shape
        # S_j (fast_cosine.py) from the logits (B x C) when they are intact and the smaller read
        # (D > B); else from W and the new dW (C x D), which needs no target values
        from_logits = ctx.out._version == ctx.version and dim > batch
        unit_slope = slope is None and ctx.scalar_slope == 1.0
        with no_autocast(xs.device.type):
            grad_out = grad_out.to(out_dtype)
            if unit_slope and not (from_logits and ctx.replaced):  # G' holds the right target entries
                fix_labels = g_target = None
            else:  # d loss / d (s t_b) = G_by phi'(t_b); as G' (divided by ||W_y||)
                fix_labels = labels
                g_target = grad_out.gather(1, labels.view(-1, 1)).squeeze(1)
                if not unit_slope:
                    g_target = g_target.mul_(slope if slope is not None else ctx.scalar_slope)
                g_target.mul_(inv[labels])
            grad_xs, grad_w = normalized_backward(
                grad_out,
                xs,
                xc,
                weight,
                wc,
                inv,
                ctx.out,
                from_logits,
                fix_labels,
                g_target,
                target,
                mm_dtype,
                out_dtype,
            )
            # xs = x s / ||x||: dx = (g - xs (g . xs) / s^2) s / ||x||; scale_x is 0 for a zero feature.
            # Below FEATURE_EPS xs = x s / FEATURE_EPS, a constant scale: dx = g s / FEATURE_EPS (no projection)
            along = torch.linalg.vecdot(grad_xs, xs).unsqueeze(1).mul_(exact)
            grad_x = grad_xs.addcmul_(xs, along, value=-1.0 / ctx.s**2).mul_(scale_x)
        return grad_x.to(ctx.x_dtype), grad_w.to(weight.dtype), None, None, None, None, None


def fused_cosine_margin(
    x: Tensor, weight: Tensor, labels: Tensor, s: float, bound: float, margin_and_slope: MarginAndSlope, precise: bool
) -> tuple[Tensor, Tensor]:
    """(training logits (B x C, at least float32), the target logits s t before the margin (B, no
    gradient)) of a cosine-margin head; see the module doc. ``x`` are the raw features."""
    logits, target = _FusedCosineMargin.apply(
        x, weight, labels.long(), float(s), float(bound), margin_and_slope, precise
    )
    return logits, target


def with_slope(cos_target: Tensor, margin_and_slope: MarginAndSlope) -> Tensor:
    """phi(t) as an autograd expression with the head's slope: for heads that edit the cosines with
    ordinary ops (sub-centres, CurricularFace, Partial FC). The value is phi(t) exactly, the
    gradient d phi / d t; it is built from plain ops so torch.compile traces it."""
    with torch.no_grad():
        value, slope = margin_and_slope(cos_target.detach())
    return value + (cos_target - cos_target.detach()) * slope
