"""SphereFace2 (Wen et al., ICLR 2022): one binary classifier per class, a loss of its own (heads/output.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from marginlab.checks import check_float
from marginlab.errors import ConfigError
from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import NORM_EPS, fused_linear, normalize_features
from marginlab.heads.output import HeadLoss
from marginlab.heads.probe import ProbeMargin

#: SphereFace2-C (additive cosine), -A (additive angular), -M (multiplicative angular): the official magn_type
VARIANTS = ("C", "A", "M")
#: how W's normalisation enters the gradient: as the official code (rows renormalised in place, dW of the plain
#: product) or the exact derivative of x . W_j / ||W_j|| (W left as it is)
MODES = ("official", "exact")
#: the official acos input clamp and angle clamp (opensphere model/head/sphereface2.py, variants A and M)
COS_CLAMP = 1.0 - 1e-5
ANGLE_MIN, ANGLE_MAX = 1e-5, 3.14159


def initial_bias(variant: str, alpha: float, r: float, m: float, t: float, num_classes: int) -> float:
    """The closed-form initial b of the official constructor (SphereFace2 sec. 3.3: b makes the initial loss of the
    positive and the C - 1 negatives balance at cos theta = 0 for every class)."""
    z = alpha / ((1.0 - alpha) * (num_classes - 1.0))
    if variant == "C":
        ay, ai = r * (2.0 * 0.5**t - 1.0 - m), r * (2.0 * 0.5**t - 1.0 + m)
    else:  # the target at theta = pi/2 with its angular margin, the others at pi/2
        theta_y = min(math.pi, math.pi / 2.0 + m) if variant == "A" else min(math.pi, m * math.pi / 2.0)
        ay, ai = r * (2.0 * ((math.cos(theta_y) + 1.0) / 2.0) ** t - 1.0), r * (2.0 * 0.5**t - 1.0)
    temp = (1.0 - z) ** 2 + 4.0 * z * math.exp(ay - ai)
    return math.log(2.0 * z) - ai - math.log(1.0 - z + math.sqrt(temp))


def similarity_adjust(cos: Tensor, t: float) -> Tensor:
    """g(cos) = 2 ((cos + 1) / 2)^t - 1 (SphereFace2 eq. 9, the similarity adjustment)."""
    return 2.0 * ((cos + 1.0) / 2.0).pow(t) - 1.0


def unit_row_cosine(head: MarginHead, x_hat: Tensor) -> Tensor:
    """x_hat . W_j / ||W_j|| (B x C) with the gradient ``head.mode`` gives it (opensphere's heads, official): a training
    forward first renormalises W's rows in place, as opensphere's ``self.w.data = F.normalize(self.w.data, dim=0)``
    under no_grad, and differentiates the plain product (dW = G^T x_hat); exact (and every evaluation forward, which
    never moves W): the exact derivative of the normalised product, W left as it is."""
    if head.mode == "official" and head.training:
        with torch.no_grad():  # opensphere: W <- W / ||W|| in place, every training forward
            head.weight.div_(torch.linalg.vector_norm(head.weight, dim=1, keepdim=True).clamp_min_(NORM_EPS))
        return fused_linear(x_hat, head.weight).logits
    return fused_linear(x_hat, head.weight, normalize_weight=True).logits


class _BinaryLoss(torch.autograd.Function):
    """The weighted binary cross-entropy of SphereFace2 eq. 5 over all B x C logits z = r g_j + b, with the official
    gradient: g's margin term is a constant (``d_theta`` under no_grad), so d z / d cos = r. The value and the
    gradient are made in one pass over the B x C block; only the gradient (B x C) is kept for the backward."""

    @staticmethod
    def forward(ctx, cos, bias, values, labels, r, alpha, scale):
        # values: r (cos + d_theta) (B x C, no gradient), overwritten in place
        z = values.add_(bias.to(values.dtype))
        col = labels.view(-1, 1)
        z_y = z.gather(1, col).squeeze(1)
        # log(1 + e^z), exactly (no threshold): max(z, 0) + log1p(e^-|z|)
        softplus = z.abs().neg_().exp_().log1p_().add_(z.clamp_min(0.0))
        sp_y = softplus.gather(1, col).squeeze(1)
        # SphereFace2 eq. 5: lambda log(1 + e^-z_y) + (1 - lambda) sum_{j != y} log(1 + e^z_j), mean over B, x lw/r
        # (the official BCE-with-logits mean over B x C with weights lw C / r (lambda or 1 - lambda));
        # log(1 + e^-z) = log(1 + e^z) - z
        loss = scale * ((1.0 - alpha) * (softplus.sum() - sp_y.sum()) + alpha * (sp_y - z_y).sum())
        # d/dz: (1 - lambda) sigmoid(z) for the negatives, -lambda sigmoid(-z_y) for the target
        grad = softplus.sub_(z).neg_().exp_().mul_(scale * (1.0 - alpha))  # sigmoid(z) = e^(z - softplus(z))
        grad_y = sp_y.neg().exp_().mul_(-scale * alpha)  # -sigmoid(-z_y) = -e^-softplus(z_y)
        grad.scatter_(1, col, grad_y.view(-1, 1))
        ctx.save_for_backward(grad)
        ctx.r = r
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        return loss.to(cos.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        grad_bias = (grad.sum() * grad_loss).to(ctx.bias_dtype).reshape(ctx.bias_shape)
        return grad * (grad_loss * ctx.r), grad_bias, None, None, None, None, None


class OpensphereLossHead(MarginHead):
    """What the opensphere heads (SphereFace2, SphereFace-R) share: a loss of their own, W drawn as the official
    ``nn.init.xavier_normal_(self.w)`` on the D x C kernel (N(0, 2 / (D + C))), and W's normalisation per ``mode``
    (``unit_row_cosine``)."""

    produces_loss = True
    official_init = "xavier_normal"
    #: a training forward renormalises ``weight`` in place (mode official): the contract allows it to move
    renormalizes_weight = True


class SphereFace2Head(OpensphereLossHead):
    """SphereFace2: C binary classifiers ``z_j = r g(cos theta_j) + b``, the positive's shifted by -r m, the
    negatives' by +r m (variant C), with the weighted binary cross-entropy of eq. 5 as the loss.

    Ported from ydwen/opensphere ``model/head/sphereface2.py`` at 032c31b8918fb7639d3b34ac7433bfd537c6c518 (the
    last commit with variants A and M; the 2023 rewrite, opensphere/module/head/sphereface2.py at a679e82, keeps
    only C, same maths). Names as the official constructor: ``alpha`` is the paper's lambda (eq. 5), ``r`` the
    scale, ``m`` the margin, ``t`` the similarity adjustment g (eq. 9), ``lw`` the loss weight; ``variant`` is the
    official ``magn_type``; ``bias_init`` replaces the official initial b (null: the closed form):

    - C: g(cos theta_y) - m for the positive, g(cos theta_j) + m for the negatives;
    - A: g(cos(theta_y + m)), the angle clamped to [1e-5, 3.14159] (the official clamps), negatives g(cos theta_j);
    - M: g(cos(m theta_y)), same clamps.

    As the official code: the margin and g enter the value only (``d_theta`` under no_grad), so the gradient of
    every logit in cos theta is r; ``b`` (a Parameter, shape [1]) starts at the official closed form
    (``initial_bias``: the losses balance for a feature at 90 deg from every class, as a high-dimensional one is),
    or at ``bias_init``; the loss is ``lw * C / r`` times the mean over B x C of the weighted BCE, i.e.
    ``lw / r`` times the per-sample sum of eq. 5. The official W is the D x C kernel ``w``: here ``weight`` is its
    transpose, drawn as its ``xavier_normal_``. ``mode="official"`` renormalises W's rows in place before every
    training forward (``self.w.data = F.normalize(self.w.data)`` under no_grad), so dW is that of the plain product
    x_hat W^T; ``mode="exact"`` leaves W as it is and differentiates through its normalisation. Evaluation forwards
    never move W. Features are ``normalize_features``' x / max(||x||, 1e-3) (the official F.normalize: 1e-12; the
    same above ||x|| = 1e-3). ``head(x)`` gives the margin-free binary logits r g(cos theta_j) + b.
    """

    normalized_features = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        variant: str = "C",
        alpha: float = 0.7,
        r: float = 40.0,
        m: float = 0.4,
        t: float = 3.0,
        lw: float = 50.0,
        mode: str = "official",
        bias_init: float | None = None,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        if variant not in VARIANTS:
            raise ConfigError(f"variant={variant!r} is not allowed: it must be one of {', '.join(VARIANTS)}")
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r} is not allowed: it must be one of {', '.join(MODES)}")
        if num_classes < 2:  # the bias init divides by C - 1
            raise ConfigError(f"num_classes={num_classes} is not allowed for SphereFace2: it must be >= 2")
        self.variant, self.mode = variant, mode
        self.alpha = check_float("alpha", alpha)
        if not 0.0 < self.alpha < 1.0:  # the positive's weight; the negatives' is 1 - alpha
            raise ConfigError(f"alpha={alpha!r} is not allowed: it must lie in (0, 1)")
        self.r = check_float("r", r, low=0.0, low_inclusive=False)
        low_m = 0.0 if variant != "M" else 1.0  # M multiplies the angle: m >= 1 is a margin
        self.m = check_float("m", m, low=low_m)
        self.t = check_float("t", t, low=0.0, low_inclusive=False)
        self.lw = check_float("lw", lw, low=0.0, low_inclusive=False)
        self.bias_init = None if bias_init is None else check_float("bias_init", bias_init)
        if self.bias_init is None:  # the official closed form (e^(ay - ai) cannot overflow: ay <= ai for these m)
            b = initial_bias(variant, self.alpha, self.r, self.m, self.t, num_classes)
        else:  # a threshold of one's own, e.g. for a low-dimensional feature (configs/head/sphereface2.yaml)
            b = self.bias_init
        # the official self.b: nn.Parameter(torch.Tensor(1)), constant b
        self.b = nn.Parameter(torch.full((1,), b))
        # the probe's margin: A and M are exact for any t (g is monotone); C's 2m is between g values, read as a
        # cosine margin (exact at t = 1)
        self.probe_margin = {
            "C": ProbeMargin(m3=2.0 * self.m),
            "A": ProbeMargin(m2=self.m),
            "M": ProbeMargin(m1=self.m),
        }[variant]

    @torch.no_grad()
    def margin_values(self, cos: Tensor, labels: Tensor) -> Tensor:
        """g with the margin, B x C, as the official no_grad block: the positive's column with its margin."""
        col = labels.view(-1, 1)
        if self.variant == "C":
            g = similarity_adjust(cos, self.t)
            g_y = g.gather(1, col) - self.m  # SphereFace2-C: g(cos theta_y) - m for the positive
            return g.add_(self.m).scatter_(1, col, g_y)  # g(cos theta_j) + m for the negatives
        # A / M: cos of the clamped angle; a negative's angle is unchanged, so cos(acos(c)) = the clamped c
        c_y = cos.gather(1, col).clamp_(-COS_CLAMP, COS_CLAMP).acos_()
        # SphereFace2-A: theta_y + m; SphereFace2-M: m theta_y (the official scatter reduce add / multiply)
        angle = c_y + self.m if self.variant == "A" else c_y * self.m
        g = cos.clamp(-COS_CLAMP, COS_CLAMP)
        g.scatter_(1, col, angle.clamp_(ANGLE_MIN, ANGLE_MAX).cos_())
        return similarity_adjust(g, self.t)

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        cos = unit_row_cosine(self, normalize_features(embeddings))
        labels = labels.long()
        with torch.no_grad():
            values = self.margin_values(cos.detach(), labels).mul_(self.r)  # r (cos + d_theta)
            predicted = cos.detach().argmax(1)
        scale = self.lw / (self.r * embeddings.shape[0])
        loss = _BinaryLoss.apply(cos, self.b, values, labels, self.r, self.alpha, scale)
        return HeadLoss(loss, predicted)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        """The margin-free binary logits r g(cos theta_j) + b (SphereFace2 eq. 9); their sigmoid is each class's
        probability. Training goes through ``loss``."""
        cos = self.normalized_cosine(embeddings)
        return self.r * similarity_adjust(cos, self.t) + self.b.to(cos.dtype)

    def schedule_values(self) -> dict[str, float]:
        return {"b": float(self.b.detach())}
