"""AdaFace (Kim, Jain, Liu, CVPR 2022): margin adapted to image quality, proxied by the feature norm."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.heads.base import CosineMarginHead
from marginlab.heads.kernels import ChunkedMargin
from marginlab.heads.probe import ProbeMargin
from marginlab.heads.target_margin import Margin, StepMargin, chunked, margin_logits


class AdaFaceHead(CosineMarginHead):
    """Target logit ``s (cos(clip(theta_y + g_angle, eps, pi - eps)) - g_add)``, others ``s cos theta_j``.

    The head receives the raw (unnormalised) embeddings and computes their norms itself; the norms
    are clipped to [0.001, 100] and detached, so they steer the margin but get no gradient.
    ``batch_mean`` / ``batch_std`` are buffers (in the state dict): EMAs of the batch mean and
    (unbiased) std of the clipped norms with rate ``t_alpha``, started at 20 and 100 and updated in
    training forwards before use, as in the official code (mk-minchul/AdaFace, head.py). A batch of
    one sample leaves ``batch_std`` unchanged (its std is undefined). As in the official code all
    cosines are clamped to [-1 + eps, 1 - eps] (eps = 1e-3) in the training logits, so ``m = 0``
    gives NormFace's logits except within 1e-3 of cos = +-1. Evaluation logits are plain s cos theta.

    With ``h = 0`` the head is CosFace with margin m; the probe counts violations with that additive
    cosine margin m (the margin of a sample of average norm). The target cosine is taken in float64
    from the B target rows (``cosine_and_target``), not from the (possibly bf16) product.
    """

    eps = 1e-3
    # mk-minchul/AdaFace head.py: kernel.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5) (unit-norm classes)
    official_init = "uniform_unit_rows"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        **common,
    ):
        super().__init__(in_features, num_classes, s=s, **common)
        self.m = check_float("m", m, low=0.0, high=math.pi / 2)
        self.h = check_float("h", h, low=0.0, high=10.0)
        self.t_alpha = check_float("t_alpha", t_alpha, low=0.0, high=1.0, low_inclusive=False)
        self.probe_margin = ProbeMargin(m3=self.m)  # CosFace with margin m (h = 0)
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def margin_scaler(self, norms: Tensor) -> Tensor:
        """The normalised feature norm in [-1, 1]; updates the EMA buffers first when training."""
        safe = norms.detach().clamp(0.001, 100.0)
        if self.training:
            with torch.no_grad():
                # AdaFace, EMA of the norm statistics (mu_z, sigma_z): mu <- a mu_batch + (1 - a) mu
                self.batch_mean.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe.mean())
                if safe.numel() > 1:
                    self.batch_std.mul_(1.0 - self.t_alpha).add_(self.t_alpha * safe.std())
        mean, std = self.batch_mean.to(safe.dtype), self.batch_std.to(safe.dtype)
        # AdaFace, normalised norm: ||z||^ = clip((||z|| - mu) / (sigma + eps) * h, -1, 1)
        return ((safe - mean) / (std + self.eps) * self.h).clamp(-1.0, 1.0)

    def target_margin(self, embeddings: Tensor) -> StepMargin:
        """The adaptive target cosine, every cosine clamped to [-1 + eps, 1 - eps]; updates the norm statistics."""
        scaler = self.margin_scaler(torch.linalg.vector_norm(at_least_float32(embeddings.detach()), dim=1))
        # AdaFace, adaptive margins: g_angle = -m ||z||^,  g_add = m ||z||^ + m
        g_angle = -self.m * scaler
        g_add = self.m + self.m * scaler

        def margin(cos_target: Tensor) -> Margin:
            theta = torch.acos(self.clamp_cosine(cos_target))  # B values only
            # AdaFace, target logit: s (cos(theta_y + g_angle) - g_add), angle kept in [eps, pi - eps]
            return Margin(torch.cos((theta + g_angle).clamp(self.eps, math.pi - self.eps)) - g_add, self.clamp_cosine)

        return margin

    def clamp_cosine(self, cos: Tensor) -> Tensor:
        """The official clamp of every training cosine to [-1 + eps, 1 - eps]."""
        return cos.clamp(-1.0 + self.eps, 1.0 - self.eps)

    def chunked_margin(self, embeddings: Tensor) -> ChunkedMargin:
        """The chunked loss's margin, built from ``target_margin`` (heads/target_margin.py)."""
        return chunked(self.target_margin(embeddings))

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            cos = self.normalized_cosine(embeddings)
            return cos * self.s
        cos, cos_target = self.cosine_and_target(embeddings, labels)  # the target in float64
        return margin_logits(cos, cos_target, labels, self.s, self.target_margin(embeddings))

    def schedule_values(self) -> dict[str, float]:
        return {"batch_mean": float(self.batch_mean.item()), "batch_std": float(self.batch_std.item())}
