"""AdaCos (Zhang et al., CVPR 2019): normalised cosine softmax whose scale is set from the class count, or adapted."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.errors import ConfigError
from marginlab.heads.base import CosineMarginHead
from marginlab.heads.output import HeadLoss

#: fixed: s = sqrt(2) log(C - 1); dynamic: s adapted every training step from the batch
MODES = ("fixed", "dynamic")
#: the median of the batch's target angles: the statistical one (even B: the mean of the two middle angles), or
#: torch.median's lower one (the common reimplementation, 4uiiurz1/pytorch-adacos)
MEDIANS = ("middle", "lower")


def fixed_scale(num_classes: int) -> float:
    """AdaCos, fixed scale: s_f = sqrt(2) log(C - 1)."""
    return math.sqrt(2.0) * math.log(num_classes - 1)


class AdaCosHead(CosineMarginHead):
    """Logits ``s cos theta_j`` for every class, no margin; the scale s is the paper's.

    There is no official code: this is implemented from the paper (Zhang, Zhao, Yan, Yi, Li, "AdaCos: Adaptively
    Scaling Cosine Logits for Effectively Learning Deep Face Representations", CVPR 2019).

    ``mode="fixed"``: s = sqrt(2) log(C - 1) for the whole run (NormFace with that s; chunked and Partial FC work).
    ``mode="dynamic"``: s is the buffer ``scale`` (in the state dict, so a resumed run goes on with it), started at
    sqrt(2) log(C - 1); each training forward with labels first sets, from the batch's cosines and the previous s,

        B_avg = (1/N) sum_i sum_{k != y_i} exp(s_prev cos theta_{i,k})
        s     = log(B_avg) / cos(min(pi/4, theta_med)),   theta_med the median of the batch's target angles,

    and then scales that step's logits by the new s (treated as a constant by autograd). ``log B_avg`` is taken as a
    log-sum-exp (no overflow). ``median="middle"`` (default) is the statistical median (even B: the mean of the two
    middle angles); ``"lower"`` is torch.median's lower one. Evaluation forwards leave s unchanged.

    Where the common reimplementation (4uiiurz1/pytorch-adacos metrics.py, commit
    35c086cc07087657595e1d10eaddefb3b3a46f35) differs: its median is torch.median's lower median
    (``median="lower"`` here); its s is a plain attribute, not saved, so a resumed run restarts from
    sqrt(2) log(C - 1) (here a buffer); its angles are of cosines clamped to [-1 + 1e-7, 1 - 1e-7]; it sums
    exp(s cos) directly (overflow in float32 once s cos > 88); its unused ``m`` argument and xavier init. Its
    B_avg (over non-target classes, divided by the batch size), the clamp of theta_med at pi/4 and the update
    before use are as in the paper and here. W starts as nn.Linear's (the paper names no initialisation).

    ``mode="dynamic"`` refuses ``chunked=true`` and Partial FC: B_avg needs every class's exp(s cos theta) before
    the logits are scaled. Under torchrun each rank adapts s from its own batch for its step (not all-reduced); DDP
    broadcasts rank 0's buffers before every forward, so rank 0's s is the one carried on and saved.
    """

    precise_target = False  # no margin: the target logit is s cos theta_y like every other
    #: why Partial FC cannot shard this head (None: it can; mode=dynamic sets it)
    partial_fc_refusal: str | None = None

    def __init__(self, in_features: int, num_classes: int, mode: str = "dynamic", median: str = "middle", **common):
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed: it must be one of {', '.join(MODES)}")
        if median not in MEDIANS:
            raise ConfigError(f"median={median!r} is not allowed: it must be one of {', '.join(MEDIANS)}")
        if "s" in common:
            raise ConfigError(
                f"s={common['s']!r} is not allowed with AdaCosHead: its scale is sqrt(2) log(C - 1) (mode=fixed) or "
                "adapted (mode=dynamic); use head=normface for a scale of your own"
            )
        chunked = common.get("chunked", False)
        if mode == "dynamic" and chunked is True:
            raise ConfigError(
                "chunked=true is not allowed with AdaCosHead mode=dynamic: its scale needs every class's "
                "exp(s cos theta) before the logits; use chunked=false or mode=fixed"
            )
        self.mode = mode  # (before the base sets ``s``)
        super().__init__(in_features, num_classes, s=1.0, **common)
        if self.num_classes < 3:
            raise ConfigError(
                f"num_classes={num_classes} is not allowed with AdaCosHead: its scale sqrt(2) log(C - 1) needs C >= 3"
            )
        self.s = fixed_scale(self.num_classes)
        self.median = median
        if mode == "dynamic":
            # the scale is state: a buffer (float64: s_0 exact), saved and resumed, updated in place so that DDP's
            # buffer broadcast keeps reaching it; ``s`` reads a copy of it
            self.register_buffer("scale", torch.tensor(fixed_scale(num_classes), dtype=torch.float64))
            self.partial_fc_refusal = (
                "mode=dynamic adapts s from every class's exp(s cos theta); use mode=fixed with Partial FC"
            )
            if self.chunked == "auto":
                self.keep_unchunked("mode=dynamic adapts s from the B x C logits")

    @property
    def s(self) -> float | Tensor:
        """The scale: the fixed float, or (mode=dynamic) a copy of the ``scale`` buffer, so the graph of a step never
        holds the buffer that the step then updates."""
        if self.mode == "dynamic":
            return self.scale.detach().clone()
        return self._fixed_s

    @s.setter
    def s(self, value: float) -> None:
        self._fixed_s = value

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, float]:
        return cos_target, 1.0

    @torch.no_grad()
    def dynamic_scale(self, logits: Tensor, labels: Tensor, s_prev: Tensor) -> Tensor:
        """The new s from this batch's logits ``s_prev cos theta`` (B x C) (AdaCos, dynamic scale)."""
        target = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, labels.view(-1, 1), -math.inf)  # k != y_i
        # AdaCos: B_avg = (1/N) sum_i sum_{k != y_i} exp(s_prev cos theta_{i,k}), as a log-sum-exp
        log_b_avg = torch.logsumexp(others.reshape(-1), dim=0) - math.log(labels.shape[0])
        theta = torch.acos((target / s_prev).clamp(-1.0, 1.0))
        # AdaCos: theta_med, the median of the target angles of the batch
        med = theta.quantile(0.5) if self.median == "middle" else theta.median()
        # AdaCos: s = log B_avg / cos(min(pi/4, theta_med))
        return log_b_avg / torch.cos(med.clamp_max(math.pi / 4))

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, *, stats: bool = False) -> Tensor | HeadLoss:
        if self.mode == "fixed" or labels is None or not self.training:
            return super().forward(embeddings, labels, stats=stats)
        s_prev = self.s
        # s_prev cos theta (the previous step's scale; dynamic s never chunks: logits), rescaled below: without
        # ``stats``, so the criterion reads the statistics from ``cosine``
        logits = super().forward(embeddings, labels)
        with torch.no_grad():
            self.scale.copy_(self.dynamic_scale(logits.detach(), labels, s_prev.to(logits.dtype)))
        return logits * (self.s.to(logits.dtype) / s_prev.to(logits.dtype))  # this step's s cos theta

    def schedule_values(self) -> dict[str, float]:
        return {"s": float(self.s)} if self.mode == "dynamic" else {}
