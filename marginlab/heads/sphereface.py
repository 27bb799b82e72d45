"""SphereFace / A-Softmax (Liu et al., CVPR 2017): L-Softmax with class weights normalised every forward."""

from __future__ import annotations

import torch
from torch import Tensor

from marginlab.dtypes import at_least_float32
from marginlab.errors import ConfigError
from marginlab.heads.kernels import fused_linear
from marginlab.heads.lsoftmax import _NORM_EPS, LSoftmaxHead, angle_segment, psi

#: the two ways of computing the gradient, see SphereFaceHead
MODES = ("exact", "official")
#: the margins the official Caffe layer implements (MarginInnerProductParameter: SINGLE .. QUADRUPLE)
OFFICIAL_M = (1, 2, 3, 4)


def chebyshev_u(cos: Tensor, n: int) -> Tensor:
    """U_n(cos), the Chebyshev polynomial of the second kind: d cos(m theta) / d cos theta = m U_{m-1}."""
    prev, cur = torch.ones_like(cos), 2.0 * cos
    if n == 0:
        return prev
    for _ in range(n - 1):  # U_{k+1} = 2 c U_k - U_{k-1}
        prev, cur = cur, 2.0 * cos * cur - prev
    return cur


class SphereFaceHead(LSoftmaxHead):
    """A-Softmax: features not normalised, ``||W_j|| = 1``, no bias.

    Target logit ``||x|| (psi(theta_y) + lambda cos(theta_y)) / (1 + lambda)``, other logits
    ``||x|| cos(theta_j)``; evaluation logits ``||x|| cos(theta_j)``. psi and the lambda annealing are
    L-Softmax's (see lsoftmax.py); the annealing is the official layer's: ``iteration`` is advanced
    before lambda = max(lambda_min, base (1 + gamma iteration)^-power) is read, once per training forward.
    Defaults: the official training prototxt (wy1iu/sphereface train/code/sphereface_model.prototxt:
    m = 4, base 1000, gamma 0.12, power 1, lambda_min 5 — lambda reaches 5 near iteration 1,658).
    m = 1 is the paper's "modified softmax" (normalised weights, no bias, no margin).

    ``mode="exact"`` (default): W is divided by its row norms inside the forward (the parameter is left
    as it is) and every gradient is the exact derivative of these logits.

    ``mode="official"``: the Caffe layer of wy1iu/sphereface (tools/caffe-sphereface/src/caffe/layers/
    margin_inner_product_layer.cpp / .cu), m in 1..4 only:

    - every forward renormalises the rows of the parameter W itself to unit norm, in place (weight
      decay and momentum then act on the unit rows, as in Caffe);
    - the weight gradient is that of the plain product, ``dW = G^T x`` for every entry, the target's
      included (neither psi nor the normalisation enters it);
    - the x-gradient of a non-target logit is ``G_bj W_j``; of the target logit
      ``G_by ((c_w W_y + c_x x) / (1 + lambda) + lambda / (1 + lambda) W_y)``, where
      ``(c_w, c_x) = (psi'(cos), (psi - cos psi') / ||x||)`` (the exact coefficients of ``||x|| psi``)
      rescaled to unit length, ``c_w^2 + c_x^2 = 1``, as the Caffe code does; for m = 1 (SINGLE) it is
      ``G W`` throughout.

    The forward values are the same in both modes. The official layer divides by ||x|| unguarded; here
    a zero feature gets cos = 0 and finite gradients. W starts as Caffe's xavier filler (``init=official``).
    """

    normalize_weights = True
    # wy1iu/sphereface train/code/sphereface_model.prototxt, fc6: weight_filler xavier (Caffe, fan_in)
    official_init = "caffe_xavier"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        mode: str = "exact",
        **common,
    ):
        super().__init__(
            in_features, num_classes, m=m, base=base, gamma=gamma, power=power, lambda_min=lambda_min, **common
        )
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed: it must be one of {', '.join(MODES)}")
        if mode == "official" and self.m not in OFFICIAL_M:
            raise ConfigError(
                f"m={self.m} is not allowed with mode='official': the Caffe layer implements "
                f"m in {', '.join(map(str, OFFICIAL_M))} (use mode='exact' for larger m)"
            )
        self.mode = mode

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        if self.mode == "exact":
            return super().logits(embeddings, labels)
        with torch.no_grad():  # SphereFace Caffe layer: W_j <- W_j / ||W_j|| in place, every forward
            self.weight.div_(torch.linalg.vector_norm(self.weight, dim=1, keepdim=True).clamp_min_(_NORM_EPS))
        # x . W_j with the unit rows: dx = G W, dW = G^T x, as the Caffe layer's gemms
        fused = fused_linear(embeddings, self.weight, labels)
        wx = fused.logits
        if labels is None:
            return wx
        x = at_least_float32(embeddings)
        x_norm = torch.linalg.vector_norm(x, dim=1)
        if self.training:
            self.iteration += 1
        lam = self.current_lambda().to(wx.dtype)
        dot = fused.target  # x . W_y (||W_y|| = 1), in float64 from the B rows; its gradient is the product's
        with torch.no_grad():
            xn = x_norm.detach()
            cos = (dot.detach() / xn.clamp_min(_NORM_EPS)).clamp(-1.0, 1.0)
            psi_value = psi(cos, self.m)
            # A-Softmax target logit: (lambda x.W_y + ||x|| psi(theta_y)) / (1 + lambda)
            value = (lam * dot.detach() + xn * psi_value) / (1.0 + lam)
            # Caffe layer, target x-gradient: coeff_w = psi'(cos) = (-1)^k m U_{m-1}(cos),
            # coeff_x = (psi - cos psi') / ||x||, the pair rescaled to unit length
            sign = 1.0 - 2.0 * torch.remainder(angle_segment(cos, self.m), 2.0)
            coeff_w = sign * self.m * chebyshev_u(cos, self.m - 1)
            coeff_x = (psi_value - cos * coeff_w) / xn.clamp_min(_NORM_EPS)
            unit = torch.sqrt(coeff_w * coeff_w + coeff_x * coeff_x).clamp_min_(_NORM_EPS)
            w_y = self.weight[labels].to(wx.dtype)
            # d target / d x = ((c_w W_y + c_x x) / (1 + lambda) + lambda / (1 + lambda) W_y); the product
            # already gives W_y, this adds the rest
            extra = ((coeff_w / unit - 1.0).unsqueeze(1) * w_y + (coeff_x / unit).unsqueeze(1) * x.detach()) / (
                1.0 + lam
            )
        # the value, with the Caffe x-gradient and the plain W gradient (through dot only)
        along = torch.linalg.vecdot(x, extra)
        target = dot + (value - dot.detach()) + (along - along.detach())
        return fused.replace_target(labels, target)

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        if self.mode == "exact":
            return super().cosine(embeddings)
        # x . W_j / (||W_j|| ||x||) with W as it is (the official forward makes its rows unit first, in place)
        wx = fused_linear(embeddings, self.weight).logits
        return self._cosine_of(wx, embeddings, torch.linalg.vector_norm(self.weight, dim=1, dtype=wx.dtype))
