"""SphereFace-R (Liu, Wen et al., "SphereFace Revived", TPAMI 2022): SphereFace's multiplicative angular margin,
its gradient detached from the margin; a loss of its own (heads/output.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.errors import ConfigError
from marginlab.heads.kernels import normalize_features
from marginlab.heads.output import HeadLoss
from marginlab.heads.probe import ProbeMargin
from marginlab.heads.sphereface2 import ANGLE_MAX, ANGLE_MIN, COS_CLAMP, MODES, OpensphereLossHead, unit_row_cosine

#: H: hard feature normalisation (logits s ...); N: no feature normalisation (||x|| ...); S: soft (||x||, plus
#: t |  ||x|| - s |) -- the official SphereFaceR_H / _N / _S
VARIANTS = ("H", "N", "S")
#: the official magn_type: v0 SphereFace's psi, v1 the angle m theta clamped to pi, v2 the margin on the negatives
VERSIONS = ("v0", "v1", "v2")


@torch.no_grad()
def margin_values(cos: Tensor, labels: Tensor, version: str, m: float) -> Tensor:
    """cos theta + d_theta (B x C), opensphere spherefacer.py ``get_d_theta``: m theta_y on the target's angle only."""
    col = labels.view(-1, 1)
    c = cos.clamp(-COS_CLAMP, COS_CLAMP)  # the official acos input clamp
    if version == "v2":  # SphereFace-R v2: cos(m theta_y / m) = cos theta_y, cos(theta_j / m) for the negatives
        theta = c.acos_()
        theta.scatter_(1, col, theta.gather(1, col) * m)
        return theta.div_(m).cos_()
    m_theta = c.gather(1, col).acos_().mul_(m)  # a negative's angle is unchanged: cos(acos(c)) = the clamped c
    if version == "v0":  # SphereFace eq. 6: psi = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi)
        k = (m_theta / math.pi).floor_()
        phi = (-2 * torch.remainder(k, 2) + 1) * torch.cos(m_theta) - 2.0 * k
    else:  # v1: cos(m theta), the angle clamped to [1e-5, 3.14159]
        phi = m_theta.clamp_(ANGLE_MIN, ANGLE_MAX).cos_()
    return c.scatter_(1, col, phi)


class _MarginCrossEntropy(torch.autograd.Function):
    """``weight`` x the mean cross-entropy of z = scale_b phi_bj, with the official gradient: phi's margin term is a
    constant (``d_theta`` under no_grad), so d z / d cos = scale_b and d z / d scale_b = phi. ``scale`` is s (H, no
    gradient) or the feature norms ||x|| (B x 1, N and S). Only the B x C gradient of z is kept for the backward."""

    @staticmethod
    def forward(ctx, cos, scale, phi, labels, weight):
        z = phi * scale
        col = labels.view(-1, 1)
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        loss = weight * (lse - z.gather(1, col)).mean()
        grad = z.sub_(lse).exp_()  # softmax
        grad.scatter_add_(1, col, torch.full_like(lse, -1.0)).mul_(weight / z.shape[0])  # (p - onehot) w / B
        ctx.save_for_backward(grad, scale, phi if ctx.needs_input_grad[1] else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, scale, phi = ctx.saved_tensors
        grad_scale = (grad * phi).sum(1, keepdim=True) * grad_loss if phi is not None else None
        return grad * (scale * grad_loss), grad_scale, None, None, None


class SphereFaceRHead(OpensphereLossHead):
    """SphereFace-R: logits ``s (cos theta_j + d_theta_j)`` where d_theta is a constant of the gradient (no_grad in
    the official code), so every logit's gradient in cos theta is s, and the loss ``lw CE / s``.

    Ported from ydwen/opensphere ``model/head/spherefacer.py`` at 032c31b8918fb7639d3b34ac7433bfd537c6c518 (removed
    by the 2023 rewrite). ``version`` is the official ``magn_type``:

    - v0: SphereFace's psi(theta_y) = (-1)^k cos(m theta_y) - 2k, k = floor(m theta_y / pi);
    - v1: cos(min(m theta_y, 3.14159)) (angle clamped to [1e-5, 3.14159]);
    - v2: the target's cos theta_y unchanged and cos(theta_j / m) for every negative (the same angular ratio
      m theta_y < theta_j, applied to the negatives; shipped config/train/vggface2_sfnet20_spherefacer.yml uses it).

    acos inputs are clamped to +-(1 - 1e-5) as in the official code (a negative's value of v0 / v1 is its clamped
    cosine). ``variant``: H (``SphereFaceR_H``, hard normalisation: s, m, lw; loss lw CE / s), N (``SphereFaceR_N``,
    logits ||x|| (cos + d), loss lw CE) or S (``SphereFaceR_S``: logits ||x|| (cos + d), loss lw CE / s +
    t mean | ||x|| - s |). N and S raise m during training: m = 1 + dm n, n the number of ``steps`` below the
    iteration, counted before each training forward; the counter is the buffer ``iteration`` (the official one is a
    plain attribute that a checkpoint loses: here it is saved and a resumed run goes on exactly). The official N
    constructor calls ``super(SphereFace_N, self)`` and raises NameError: the evident intent is ported. The
    official code warns that N and S "are not fully tested"; its N defaults are dm 0.1, lw 1 (H's and S's: dm 1.5,
    lw 50, the defaults here). W is the transpose of the official D x C kernel, drawn as its ``xavier_normal_``;
    ``mode`` treats W's normalisation as SphereFace2 does (official: rows renormalised in place in training, dW of
    the plain product; exact: the true derivative). The official N / S divide by ||x|| unguarded; here features go
    through ``normalize_features`` (zero feature: zero cosines). ``head(x)`` gives s cos theta_j (H) or
    ||x|| cos theta_j (N, S), margin-free.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        variant: str = "H",
        version: str = "v0",
        s: float = 30.0,
        m: float = 1.5,
        dm: float = 1.5,
        steps: list[int] | None = None,
        t: float = 0.01,
        lw: float = 50.0,
        mode: str = "official",
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        for key, value, allowed in (
            ("variant", variant, VARIANTS),
            ("version", version, VERSIONS),
            ("mode", mode, MODES),
        ):
            if value not in allowed:
                raise ConfigError(f"{key}={value!r} is not allowed: it must be one of {', '.join(allowed)}")
        self.variant, self.version, self.mode = variant, version, mode
        self.s = check_float("s", s, low=0.0, low_inclusive=False)
        self.m = check_float("m", m, low=1.0)  # a multiplicative angular margin: m = 1 is none
        self.dm = check_float("dm", dm, low=0.0)
        steps = [] if steps is None else steps
        if isinstance(steps, (str, bytes)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps
        ):
            raise ConfigError(f"steps={steps!r} is not allowed: it must be a list of integers >= 0 (iterations)")
        self.steps = [int(v) for v in steps]
        self.t = check_float("t", t, low=0.0)
        self.lw = check_float("lw", lw, low=0.0, low_inclusive=False)
        self.normalized_features = variant == "H"
        if variant != "H":  # the official self.iter, saved here so a resumed run raises m at the same steps
            self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_m(self) -> float:
        """m now: H's fixed m; N / S: 1 + dm (number of steps below the iteration), the official schedule."""
        if self.variant == "H":
            return self.m
        it = int(self.iteration)
        return 1.0 + self.dm * sum(step < it for step in self.steps)

    @property
    def probe_margin(self) -> ProbeMargin:
        # m theta_y < theta_j for every version (v2 divides the negatives' angles by m instead)
        return ProbeMargin(m1=self.current_m())

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        labels = labels.long()
        if self.variant != "H" and self.training:
            self.iteration += 1  # the official self.iter += 1, before m is read
        m = self.current_m()
        cos = unit_row_cosine(self, normalize_features(embeddings))
        with torch.no_grad():
            phi = margin_values(cos.detach(), labels, self.version, m)  # cos + d_theta
            predicted = cos.detach().argmax(1)
        if self.variant == "H":
            # SphereFace-R H: lw CE(s (cos + d)) / s
            loss = _MarginCrossEntropy.apply(cos, cos.new_tensor(self.s), phi, labels, self.lw / self.s)
            return HeadLoss(loss, predicted)
        magnitude = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True).to(cos.dtype)
        weight = self.lw if self.variant == "N" else self.lw / self.s  # N: lw CE; S: lw CE / s
        loss = _MarginCrossEntropy.apply(cos, magnitude, phi, labels, weight)
        if self.variant == "S":  # SphereFace-R S: + t mean | ||x|| - s |, the soft feature normalisation
            loss = loss + (self.t * torch.abs(magnitude - self.s)).mean()
        return HeadLoss(loss, predicted)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        """Margin-free: s cos theta_j (H) or ||x|| cos theta_j (N, S). Training goes through ``loss``."""
        cos = self.normalized_cosine(embeddings)
        if self.variant == "H":
            return self.s * cos
        return torch.linalg.vector_norm(embeddings, dim=1, keepdim=True).to(cos.dtype) * cos

    def schedule_values(self) -> dict[str, float]:
        return {} if self.variant == "H" else {"m": self.current_m()}
