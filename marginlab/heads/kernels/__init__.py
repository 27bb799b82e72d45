"""The heads' fused autograd kernels, one unit: ``fast_cosine`` (the B x C product ``x W^T``, optionally
over the class-weight norms, with a blocked hand-written backward, and the feature normalisation every
normalising head shares) and ``fused_margin`` (a cosine-margin head's whole training forward as one
Function, built on fast_cosine's blocked backward ``normalized_backward``)), and ``chunked_margin_ce`` (the same
head's cross-entropy in blocks of classes with an online log-sum-exp, never the B x C logits).

The public surface is ``__all__`` below; the heads import only these names, from this package. Inside
the unit, fused_margin uses fast_cosine's public kernel pieces (``matmul_dtypes``,
``normalized_backward``, ``feature_scale``, ``above_floor``: the floor's one rule); the rest (``_FusedLinear``,
``_Handle`` ...) is private to its module. Nothing outside ``marginlab/heads`` (and Partial FC, a head wrapper)
imports it.
"""

from marginlab.heads.kernels.chunked_margin_ce import (
    ChunkedMargin,
    RowReduce,
    TargetMargin,
    chunked_margin_cross_entropy,
)
from marginlab.heads.kernels.fast_cosine import (
    FEATURE_EPS,
    NORM_EPS,
    FusedLogits,
    class_block,
    feature_scale,
    fused_linear,
    no_autocast,
    normalize_features,
    precise_cosine,
    unfloor_ratio,
)
from marginlab.heads.kernels.fused_margin import MarginAndSlope, fused_cosine_margin, with_slope

__all__ = [
    "ChunkedMargin",
    "FEATURE_EPS",
    "NORM_EPS",
    "FusedLogits",
    "MarginAndSlope",
    "RowReduce",
    "TargetMargin",
    "chunked_margin_cross_entropy",
    "class_block",
    "feature_scale",
    "fused_cosine_margin",
    "fused_linear",
    "no_autocast",
    "normalize_features",
    "precise_cosine",
    "unfloor_ratio",
    "with_slope",
]
