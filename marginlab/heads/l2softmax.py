"""L2-constrained softmax (Ranjan, Castillo, Chellappa, 2017): alpha * x/||x|| into a plain linear classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.errors import ConfigError
from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import normalize_features
from marginlab.heads.probe import scaled_cosine, unfloored


def alpha_lower_bound(num_classes: int, p: float) -> float:
    """The paper's lower bound on alpha for a target probability p [unverified, see papers.md]."""
    # L2-softmax (Ranjan et al. 2017), lower bound: alpha_low = log(p (C - 2) / (1 - p))  [unverified]
    return math.log(p * (num_classes - 2) / (1.0 - p))


class L2SoftmaxHead(MarginHead):
    """Features L2-normalised and scaled by ``alpha`` before an ordinary linear layer (W unnormalised).

    Training and evaluation logits are the same, ``alpha W x/||x|| + b``; there is no margin.
    ``alpha="auto"`` uses the paper's lower bound for target probability ``p`` (needs more than two
    classes; the bound is marked [unverified] in papers.md). No official code: ``init=official`` keeps
    nn.Linear's kaiming_uniform(a = sqrt 5), the same as ``init=kaiming``. A zero feature maps to 0
    with a zero gradient (``normalize_features``).
    """

    probe_floored = True  # its cosines are of normalize_features' x / max(||x||, FEATURE_EPS)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        alpha: float | str = "auto",
        p: float = 0.9,
        bias: bool = True,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        if isinstance(alpha, str):
            if alpha != "auto":
                raise ConfigError(f"alpha={alpha!r} is not allowed: it must be a number > 0 or 'auto'")
            p = check_float("p", p, low=0.0, high=1.0, low_inclusive=False)
            if p >= 1.0:
                raise ConfigError(f"p={p!r} is not allowed: it must lie in (0, 1)")
            if num_classes <= 2:
                raise ConfigError(
                    f"alpha='auto' needs num_classes > 2 (got {num_classes}): the bound "
                    "log(p (C - 2) / (1 - p)) is undefined; set alpha to a number > 0"
                )
            auto = alpha_lower_bound(num_classes, p)
            if auto <= 0:
                raise ConfigError(
                    f"alpha='auto' gives log(p (C - 2) / (1 - p)) = {auto:.3g} <= 0 for "
                    f"p={p}, num_classes={num_classes}: raise p or set alpha to a number > 0"
                )
            alpha = auto
        self.alpha = check_float("alpha", alpha, low=0.0, low_inclusive=False)
        self.p = float(p)
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        # L2-softmax (Ranjan et al. 2017): f = alpha * x / ||x||, then the usual W f + b
        features = normalize_features(at_least_float32(embeddings)) * self.alpha
        return at_least_float32(F.linear(features, self.weight, self.bias))

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        """cos = (logit - b) / (alpha ||W_j||), from the evaluation logits (of x / ||x||: ``probe_floored``)."""
        logits = self.logits(embeddings, None)
        w_norms = torch.linalg.vector_norm(self.weight, dim=1, dtype=logits.dtype)
        cos = scaled_cosine(
            logits,
            col_scale=w_norms.clamp_min_(1e-12).mul_(self.alpha).reciprocal_(),
            bias=None if self.bias is None else self.bias.to(logits.dtype, copy=True),
        )
        return unfloored(cos, embeddings)
