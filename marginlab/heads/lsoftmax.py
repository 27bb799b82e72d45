"""L-Softmax (Liu, Wen, Yu, Yang, ICML 2016): target logit ||W_y|| ||x|| psi(theta_y), lambda-annealed.

Also home of the pieces SphereFace (A-Softmax) shares: ``multiple_angle_cos``, ``psi`` and the
annealed blend, which ``SphereFaceHead`` reuses by subclassing with normalised class weights.
Defaults are the official MNIST example (wy1iu/LargeMargin_Softmax_Loss,
myexamples/mnist/model/mnist_train_test.prototxt: type QUADRUPLE (m = 4), base 1000,
gamma 2.5e-5, power 35, lambda_min 0); its CIFAR-10 example uses m = 2, gamma 2e-5, power 45.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from marginlab.checks import check_float, check_positive_int
from marginlab.dtypes import at_least_float32
from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import fused_linear
from marginlab.heads.probe import ProbeMargin, scaled_cosine

#: floor on ||x|| ||W_y|| when dividing by it, so zero-norm features give cos = 0 and finite gradients
_NORM_EPS = 1e-12


def multiple_angle_cos(cos: Tensor, m: int) -> Tensor:
    """cos(m theta) as a polynomial of cos(theta) (no acos, so the gradient is polynomial too)."""
    # L-Softmax (Liu et al. 2016), multiple-angle formula:
    # cos(m theta) = sum_n (-1)^n C(m, 2n) cos^(m-2n)(theta) (1 - cos^2(theta))^n
    sin2 = 1.0 - cos * cos
    cos_powers = [None, cos]  # cos^p by repeated products: no pow(x, 0), whose gradient is 0 * inf at 0
    for _ in range(2, m + 1):
        cos_powers.append(cos_powers[-1] * cos)
    total, sin2_power = None, None
    for n in range(m // 2 + 1):
        sin2_power = None if n == 0 else (sin2 if n == 1 else sin2_power * sin2)
        p = m - 2 * n
        if p == 0:
            term = sin2_power
        elif sin2_power is None:
            term = cos_powers[p]
        else:
            term = cos_powers[p] * sin2_power
        term = term * ((-1) ** n * math.comb(m, 2 * n))
        total = term if total is None else total + term
    return total


def angle_segment(cos: Tensor, m: int) -> Tensor:
    """k with theta in [k pi/m, (k+1) pi/m], found without acos and without gradient (values 0..m-1)."""
    with torch.no_grad():
        k = torch.zeros_like(cos)
        for j in range(1, m):  # theta >= j pi/m  <=>  cos(theta) <= cos(j pi/m)
            k += (cos <= math.cos(j * math.pi / m)).to(cos.dtype)
    return k


def psi(cos: Tensor, m: int) -> Tensor:
    """psi(theta) from cos(theta): continuous, monotonically decreasing on [0, pi], psi = cos for m = 1."""
    k = angle_segment(cos, m)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    # L-Softmax (Liu et al. 2016) / A-Softmax (Liu et al. 2017): psi(theta) = (-1)^k cos(m theta) - 2k
    return sign * multiple_angle_cos(cos, m) - 2.0 * k


class LSoftmaxHead(MarginHead):
    """Linear classifier without bias whose target logit gets the multiplicative angular margin m.

    Training (labels given): logits W_j x for j != y, and for the target
    ``(lambda ||W_y|| ||x|| cos(theta_y) + ||W_y|| ||x|| psi(theta_y)) / (1 + lambda)``;
    evaluation: plain ``W x``. ``lambda = max(lambda_min, base (1 + gamma iteration)^-power)``; the
    iteration counter is a buffer (saved in the state dict, so a resumed run continues the schedule)
    that each training forward with labels advances by one before lambda is read, as the official
    Caffe layer does. m = 1 is softmax without bias.
    """

    #: SphereFace normalises the class weights every forward; L-Softmax does not
    normalize_weights: bool = False

    # wy1iu/LargeMargin_Softmax_Loss myexamples/mnist/model/mnist_train_test.prototxt (and the CIFAR ones):
    # weight_filler msra (Caffe MSRAFiller, fan_in: N(0, 2/D))
    official_init = "caffe_msra"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 2.5e-5,
        power: float = 35.0,
        lambda_min: float = 0.0,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        self.m = check_positive_int("m", m)
        # the probe's margin: multiplicative angular, m theta_y must stay below the nearest non-target angle
        self.probe_margin = ProbeMargin(m1=float(self.m))
        self.base = check_float("base", base, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0)
        self.power = check_float("power", power, low=0.0)
        self.lambda_min = check_float("lambda_min", lambda_min, low=0.0)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_lambda(self) -> Tensor:
        """lambda at the current iteration, a 0-d float32 tensor on the head's device (no host sync)."""
        it = self.iteration.to(torch.float32)
        # L-Softmax official layer: lambda = max(lambda_min, base * (1 + gamma * iter)^(-power))
        lam = self.base * torch.pow(1.0 + self.gamma * it, -self.power)
        return lam.clamp_min(self.lambda_min)

    def class_weight(self) -> Tensor:
        return F.normalize(self.weight) if self.normalize_weights else self.weight

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        # W x (or W/||W|| x for SphereFace) in one fused product that also hands back the target
        # entries W_y x and the norms ||W_y||, so the margin needs no W[labels] (whose gradient would
        # be a dense C x D tensor) and normalize(W) is never materialised (see fast_cosine.py)
        fused = fused_linear(embeddings, self.weight, labels, normalize_weight=self.normalize_weights)
        wx = fused.logits  # B x C, float32 at least; the matmul may run under autocast
        if labels is None:
            return wx
        x_norm = torch.linalg.vector_norm(at_least_float32(embeddings), dim=1)  # B (norm's gradient at 0 is 0)
        if self.training:
            self.iteration += 1
        lam = self.current_lambda().to(wx.dtype)
        dot = fused.target  # W_y . x, computed in float64 from the B rows
        # ||W_y||; for SphereFace ||W_y / ||W_y|| || = 1, a constant
        w_y_norm = self._used_weight_norms(fused)[labels] if self.normalize_weights else fused.target_norm
        xw = x_norm * w_y_norm  # ||W_y|| ||x||
        cos = (dot / xw.clamp_min(_NORM_EPS)).clamp(-1.0, 1.0)
        # L-Softmax target logit: (lambda ||W|| ||x|| cos + ||W|| ||x|| psi) / (1 + lambda)
        target = (lam * dot + xw * psi(cos, self.m)) / (1.0 + lam)
        return fused.replace_target(labels, target)

    @torch.no_grad()
    def _used_weight_norms(self, fused) -> Tensor:
        """||W_j|| as used: 1 (or less, for a zero row) once normalised (SphereFace), else ||W_j||."""
        if self.normalize_weights:
            return fused.weight_norms / fused.weight_norms.clamp_min(_NORM_EPS)
        return torch.linalg.vector_norm(self.weight.detach(), dim=1, dtype=fused.logits.dtype)

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        """W_j x / (||W_j|| ||x||), from the evaluation product W x (W / ||W|| x for SphereFace)."""
        fused = fused_linear(embeddings, self.weight, normalize_weight=self.normalize_weights)
        return self._cosine_of(fused.logits, embeddings, self._used_weight_norms(fused))

    @staticmethod
    def _cosine_of(wx: Tensor, embeddings: Tensor, w_norms: Tensor) -> Tensor:
        """The cosines of the product ``wx`` (B x C) of the features with rows of norms ``w_norms``."""
        x_norm = torch.linalg.vector_norm(at_least_float32(embeddings), dim=1)
        return scaled_cosine(
            wx,
            row_scale=x_norm.clamp_min(_NORM_EPS).reciprocal_(),
            col_scale=w_norms.clamp_min(_NORM_EPS).reciprocal_(),
        )

    def schedule_values(self) -> dict[str, float]:
        return {"lambda": float(self.current_lambda())}
