"""A head's target margin written once, and both training paths built from it.

AdaFace, MagFace and CurricularFace need more than the target cosine for their margin: the feature norms, a
running statistic, a transform of the other cosines. Each writes it once, as ``target_margin(embeddings)``: a
function of the B target cosines t, made and called once a training step (it makes the step's state updates),
that gives a ``Margin``: phi(t) and h, the elementwise transform of the other cosines, as ordinary autograd
expressions. Both paths are built from that one definition:

- ``margin_logits``: the unchunked training logits, ``s h(cos theta_j)`` with the target entries ``s phi(t)``,
  differentiated by autograd;
- ``chunked``: the chunked loss's ``TargetMargin`` (kernels/chunked_margin_ce.py). Its slopes d phi / dt and
  dh / dcos are taken from the same expressions by autograd (the gradient of their sum: they are elementwise),
  so no slope is written by hand and each equals the unchunked path's to the bit; phi keeps its autograd
  history other than t's (MagFace's margin m(||x||)), which the loss's backward takes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import ChunkedMargin, TargetMargin


@dataclass
class Margin:
    """A head's margin on one step's target cosines, as autograd expressions."""

    target: Tensor  #: phi(t) (B), made from t and whatever else the head needs (norms, state)
    others: Callable[[Tensor], Tensor] | None = None  #: h(cos) on any block of the other cosines; None: identity


#: a head's margin for one step: the B target cosines -> ``Margin``; called once a step
StepMargin = Callable[[Tensor], Margin]


def margin_logits(cos: Tensor, cos_target: Tensor, labels: Tensor, s: float, margin: StepMargin) -> Tensor:
    """The training logits ``s h(cos)`` (B x C) with the target entries ``s phi(cos_target)``, by autograd."""
    terms = margin(cos_target)
    others = cos if terms.others is None else terms.others(cos)
    return MarginHead.replace_target(others * s, labels, s * terms.target)


def chunked(margin: StepMargin) -> ChunkedMargin:
    """The chunked loss's margin: ``margin``'s values, with their slopes in t (and cos) taken by autograd."""

    def target_margin(cos_target: Tensor) -> TargetMargin:
        with torch.enable_grad():
            t = cos_target.detach().requires_grad_(True)
            terms = margin(t)
            # the graph stays: phi may carry history other than t's, which the loss's backward takes on
            slope = slope_of(terms.target, t, retain_graph=True)
        others = None if terms.others is None else partial(value_and_slope, terms.others)
        return TargetMargin(terms.target, slope, others)

    return target_margin


def value_and_slope(fn: Callable[[Tensor], Tensor], cos: Tensor, slope: bool) -> tuple[Tensor, Tensor | None]:
    """(fn(cos), d fn / d cos or None: not ``slope``) of an elementwise ``fn``, detached."""
    if not slope:  # (the chunked loss's forward: the value alone, no graph)
        with torch.no_grad():
            return fn(cos), None
    with torch.enable_grad():
        leaf = cos.detach().requires_grad_(True)
        value = fn(leaf)
        return value.detach(), slope_of(value, leaf)


def slope_of(value: Tensor, leaf: Tensor, retain_graph: bool = False) -> Tensor:
    """d value / d leaf of an elementwise map of ``leaf`` (the gradient of its sum), without autograd history."""
    return torch.autograd.grad(value, leaf, torch.ones_like(value), retain_graph=retain_graph)[0]
