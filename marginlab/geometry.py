"""Geometry of what a head learns: feature norms, angles to the target and nearest other class, margins.

Everything is computed from the cosines the head already produced (``head.last_cosine``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

RAD2DEG = 180.0 / math.pi


def target_and_nearest_other(cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """cos theta_y (B) and the largest non-target cosine max_{j != y} cos theta_j (B)."""
    idx = labels.view(-1, 1)
    target = cos.gather(1, idx).squeeze(1)
    other = cos.scatter(1, idx, float("-inf")).amax(dim=1) if cos.shape[1] > 1 else torch.full_like(target, -1.0)
    return target, other


class GeometryMeter:
    """Accumulates geometry statistics over batches; ``compute()`` gives a flat dict of floats."""

    def __init__(self):
        self.n = 0
        self.norm_sum = self.norm_sq = 0.0
        self.norm_min, self.norm_max = math.inf, -math.inf
        self.target_deg_sum = self.other_deg_sum = 0.0
        self.violations = 0

    @torch.no_grad()
    def update(self, features: Tensor, cos: Tensor, labels: Tensor, head) -> None:
        features, cos = features.float(), cos.float()
        norms = features.norm(dim=1)
        target, other = target_and_nearest_other(cos, labels)
        self.n += labels.numel()
        self.norm_sum += norms.sum().item()
        self.norm_sq += (norms * norms).sum().item()
        self.norm_min = min(self.norm_min, norms.min().item())
        self.norm_max = max(self.norm_max, norms.max().item())
        self.target_deg_sum += torch.acos(target.clamp(-1, 1)).sum().item() * RAD2DEG
        self.other_deg_sum += torch.acos(other.clamp(-1, 1)).sum().item() * RAD2DEG
        self.violations += head.margin_violation(target, other).sum().item()

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        mean = self.norm_sum / self.n
        var = max(0.0, self.norm_sq / self.n - mean * mean)
        return {"feature_norm/mean": mean, "feature_norm/std": math.sqrt(var),
                "feature_norm/min": self.norm_min, "feature_norm/max": self.norm_max,
                "angle/target_deg": self.target_deg_sum / self.n,
                "angle/nearest_other_deg": self.other_deg_sum / self.n,
                "margin/violation_frac": self.violations / self.n}


@torch.no_grad()
def weight_stats(weight: Tensor) -> dict[str, float]:
    """Class-weight norm mean/std (population)."""
    norms = weight.detach().float().norm(dim=1)
    return {"weight_norm/mean": norms.mean().item(), "weight_norm/std": norms.std(unbiased=False).item()}


def batch_geometry(features: Tensor, cos: Tensor, labels: Tensor, head) -> dict[str, float]:
    meter = GeometryMeter()
    meter.update(features, cos, labels, head)
    return {**meter.compute(), **weight_stats(head.weight)}
