"""Geometry of what a head learns: feature norms, angles to the target and nearest other class, margins.

Everything is computed from the head's cosines (its pure ``cosine``, or a training step's ``StepStats`` from the
criterion) and from what a head declares for the probe (heads/probe.py: ``probe_margin``, ``normalized_features``,
``weights_are_points``); no concrete head class is imported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.heads.probe import probe_margin

RAD2DEG = 180.0 / math.pi


def target_and_nearest_other(cos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """cos theta_y (B) and the largest non-target cosine max_{j != y} cos theta_j (B).

    From the top two cosines of each row (no B x C copy): the first unless it is the target's own.
    """
    idx = labels.view(-1, 1)
    target = cos.gather(1, idx).squeeze(1)
    if cos.shape[1] < 2:
        return target, torch.full_like(target, -1.0)
    top, top_idx = cos.topk(2, dim=1)
    other = torch.where(top_idx[:, 0] == labels, top[:, 1], top[:, 0])
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
    def update(
        self, features: Tensor, cos: Tensor | None, labels: Tensor, head, nearest: tuple[Tensor, Tensor] | None = None
    ) -> None:
        """``nearest``: ``target_and_nearest_other(cos, labels)`` when the caller has it already (``cos`` may then
        be None: the statistics read nothing else)."""
        features = features.float()
        norms = features.norm(dim=1)
        target, other = target_and_nearest_other(cos.float(), labels) if nearest is None else nearest
        self.n += labels.numel()
        self.norm_sum += norms.sum().item()
        self.norm_sq += (norms * norms).sum().item()
        self.norm_min = min(self.norm_min, norms.min().item())
        self.norm_max = max(self.norm_max, norms.max().item())
        self.target_deg_sum += torch.acos(target.clamp(-1, 1)).sum().item() * RAD2DEG
        self.other_deg_sum += torch.acos(other.clamp(-1, 1)).sum().item() * RAD2DEG
        self.violations += probe_margin(head).violation(target, other).sum().item()

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        mean = self.norm_sum / self.n
        var = max(0.0, self.norm_sq / self.n - mean * mean)
        return {
            "feature_norm/mean": mean,
            "feature_norm/std": math.sqrt(var),
            "feature_norm/min": self.norm_min,
            "feature_norm/max": self.norm_max,
            "angle/target_deg": self.target_deg_sum / self.n,
            "angle/nearest_other_deg": self.other_deg_sum / self.n,
            "margin/violation_frac": self.violations / self.n,
        }


@torch.no_grad()
def weight_stats(weight: Tensor) -> dict[str, float]:
    """Class-weight norm mean/std (population)."""
    norms = weight.detach().float().norm(dim=1)
    return {"weight_norm/mean": norms.mean().item(), "weight_norm/std": norms.std(unbiased=False).item()}


def batch_geometry(
    features: Tensor, cos: Tensor | None, labels: Tensor, head, nearest: tuple[Tensor, Tensor] | None = None
) -> dict[str, float]:
    """A batch's step statistics from its cosines, or from ``nearest`` (cos theta_y and the nearest non-target
    cosine) alone, which is all they read."""
    meter = GeometryMeter()
    meter.update(features, cos, labels, head, nearest)
    return {**meter.compute(), **weight_stats(head.weight)}


# ---- per-epoch probe statistics (geometry/probe.py) ---------------------------------------------


def is_normalized(head) -> bool:
    """Whether the head classifies normalised features (so the unit circle/sphere is worth drawing):
    its ``normalized_features`` (heads/probe.py)."""
    return bool(getattr(head, "normalized_features", False))


def weights_are_points(head) -> bool:
    """Whether the class weights are prototypes in feature space (RBF-Softmax) rather than directions:
    its ``weights_are_points`` (heads/probe.py)."""
    return bool(getattr(head, "weights_are_points", False))


@torch.no_grad()
def class_weights(head) -> Tensor:
    """The class prototypes, C x D: ``head.weight``, or for heads with k sub-centres per class (rows
    ``c*k .. c*k+k-1``) the mean of each class's normalised sub-centres."""
    weight = head.weight.detach().float()
    num_classes = getattr(head, "num_classes", weight.shape[0])
    if weight.shape[0] != num_classes and weight.shape[0] % num_classes == 0:
        k = weight.shape[0] // num_classes
        weight = torch.nn.functional.normalize(weight, dim=1).view(num_classes, k, -1).mean(dim=1)
    return weight


@torch.no_grad()
def pairwise_angles(vectors: Tensor, max_vectors: int = 2048, seed: int = 0) -> dict[str, float]:
    """Minimum and mean angle (degrees) between the directions of the rows of ``vectors`` (N x D).

    One N x N matmul of the normalised rows; above ``max_vectors`` rows a fixed random subset of that many
    is used (so the minimum is then an estimate from above). Fewer than 2 rows: empty dict.
    """
    n = vectors.shape[0]
    if n < 2:
        return {}
    if n > max_vectors:
        gen = torch.Generator().manual_seed(seed)
        vectors = vectors.index_select(0, torch.randperm(n, generator=gen)[:max_vectors].to(vectors.device))
        n = max_vectors
    unit = torch.nn.functional.normalize(vectors.float(), dim=1)
    gram = (unit @ unit.t()).clamp_(-1.0, 1.0)
    gram.fill_diagonal_(1.0)  # acos(1) = 0: the diagonal adds nothing to the sum below
    mean = torch.acos(gram).sum().item() / (n * (n - 1)) * RAD2DEG
    gram.fill_diagonal_(-1.0)
    return {"min_deg": math.acos(gram.max().item()) * RAD2DEG, "mean_deg": mean}


def weight_angle_stats(head, max_classes: int = 2048) -> dict[str, float]:
    """``weight_angle/min_deg`` and ``weight_angle/mean_deg``: pairwise angles between class prototypes."""
    return {f"weight_angle/{k}": v for k, v in pairwise_angles(class_weights(head), max_classes).items()}


@torch.no_grad()
def class_angle_stats(features: Tensor, labels: Tensor, max_classes: int = 2048) -> dict[str, float]:
    """Angular statistics of a labelled sample (N x D): the class mean direction mu_c is the normalised mean
    of the class's unit features.

    ``class_angle/intra_deg``: mean angle between a sample and its class mean direction (intra-class spread);
    ``class_angle/inter_min_deg`` / ``inter_mean_deg``: min / mean angle between the mean directions of the
    classes present in the sample.
    """
    if labels.numel() == 0:
        return {}
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    classes, index = torch.unique(labels, return_inverse=True)
    # per-class sums as differences of a running sum over the samples sorted by class (float64): O(N D).
    # index_select, not index_add_ / scatter_add_ / x[idx]: those wait milliseconds for threads on a busy CPU
    counts = torch.bincount(index, minlength=classes.numel())
    ends = counts.cumsum(0)
    running = torch.cat(
        [
            unit.new_zeros(1, unit.shape[1], dtype=torch.float64),
            unit.index_select(0, torch.argsort(index, stable=True)).double().cumsum(0),
        ]
    )
    sums = running.index_select(0, ends) - running.index_select(0, ends - counts)
    means = torch.nn.functional.normalize(sums.float(), dim=1)
    cos = (unit * means.index_select(0, index)).sum(dim=1).clamp(-1.0, 1.0)
    stats = {"class_angle/intra_deg": torch.acos(cos).mean().item() * RAD2DEG}
    inter = pairwise_angles(means, max_classes)
    if inter:
        stats.update({"class_angle/inter_min_deg": inter["min_deg"], "class_angle/inter_mean_deg": inter["mean_deg"]})
    return stats


@torch.no_grad()
def sample_angles(
    cos: Tensor | None, labels: Tensor, nearest: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Per-sample target angle theta_y and nearest non-target angle min_{j != y} theta_j, in degrees (B each).

    acos is taken of two B-vectors only, never of the B x C matrix. ``nearest``: the cosines
    ``target_and_nearest_other(cos, labels)`` when the caller has them already.
    """
    target, other = target_and_nearest_other(cos.float(), labels) if nearest is None else nearest
    return torch.acos(target.clamp(-1, 1)) * RAD2DEG, torch.acos(other.clamp(-1, 1)) * RAD2DEG
