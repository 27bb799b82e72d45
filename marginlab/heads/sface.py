"""SFace (Zhong et al., IEEE TIP 2021): sigmoid-constrained hypersphere loss, intra- and inter-class terms on
s cos theta, each re-scaled by a detached sigmoid of the angle. A loss of its own."""

from __future__ import annotations

import torch
from torch import Tensor

from marginlab.checks import check_float
from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import fused_linear, normalize_features
from marginlab.heads.output import HeadLoss
from marginlab.heads.probe import ProbeMargin


class SFaceHead(MarginHead):
    """The SFace loss (SFace, the sigmoid-constrained hypersphere loss; official ``SFaceLoss``), averaged over the
    batch:

    ``L = -w_y s cos theta_y + sum_{j != y} w_j s cos theta_j``, ``w_y = sigmoid(k (theta_y - a))``,
    ``w_j = sigmoid(-k (theta_j - b))``,

    with the weights w computed without gradient (the paper's re-scaling functions, ``torch.no_grad`` in the
    official code): the intra-class term pulls a sample towards its class while theta_y > a, the inter-class term
    pushes the other classes away while theta_j < b. Official class defaults s 64, k 80, a 0.8, b 1.23; the CASIA
    script (SFace_torch/train.sh) trains with a 0.87, b 1.2 (configs/head/sface.yaml).

    Ported from zhongyy/SFace SFace_torch/head/metrics.py (``SFaceLoss``), train.sh and train_SFace_torch.py
    (the weight init, again in its ``weight_init``), commit cb5ffb3c4863eecb3abf6a80529daffb05a0e820; the official
    ``weight`` is already C x D. Differences: the angles are acos of the cosine clamped to [-1, 1] (the official
    acos(W x / s) is NaN where rounding puts a cosine just outside, e.g. a feature collinear with its class weight,
    which makes the whole loss NaN); features are normalised with marginlab's floor (``normalize_features``;
    official F.normalize eps 1e-12); the batch mean of the intra and inter terms is returned as one loss (the
    official also returns each term and its mean cosines for logging). Evaluation scores (``head(x)``): s cos theta_j,
    the official ``output``. The angles of every B x C cosine are needed for the inter-class weights (detached).
    Partial FC and the chunked loss are refused. The margin advisor reads b - a as an angular margin; it cannot see
    that b itself must fit between the classes (10 classes in 2-D are at most 36 deg apart: a 0.1, b 0.4 train there).
    """

    # zhongyy/SFace metrics.py and train_SFace_torch.py weight_init: xavier_normal_(weight, gain=2, mode='out')
    official_init = "xavier_normal_out_gain2"
    produces_loss = True
    normalized_features = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        k: float = 80.0,
        a: float = 0.8,
        b: float = 1.23,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        self.s = check_float("s", s, low=0.0, low_inclusive=False)
        self.k = check_float("k", k, low=0.0, low_inclusive=False)
        self.a = check_float("a", a, low=0.0, high=torch.pi)
        self.b = check_float("b", b, low=0.0, high=torch.pi)
        # the intra term stops pulling below theta_y = a, the inter term pushing beyond theta_j = b: an angular
        # margin of b - a between a sample's class and the others (none when b <= a)
        self.probe_margin = ProbeMargin(m2=max(self.b - self.a, 0.0))

    def scaled_cosine(self, embeddings: Tensor) -> Tensor:
        """s cos theta_j (B x C): the official ``output``, in one fused product clamped to [-s, s]."""
        features = normalize_features(embeddings) * self.s
        return fused_linear(features, self.weight, normalize_weight=True, bound=self.s).logits

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        """The evaluation scores s cos theta_j (B x C)."""
        return self.scaled_cosine(embeddings)

    @torch.no_grad()
    def rescaling_weights(self, scos: Tensor, labels: Tensor) -> Tensor:
        """B x C: w_j = sigmoid(-k (theta_j - b)) for the other classes, -w_y = -sigmoid(k (theta_y - a)) in the
        target column (its sign that of the intra term); detached."""
        rows = torch.arange(labels.shape[0], device=labels.device)
        # acos of the clamped cosine (official: acos(W x / s), NaN just outside [-1, 1])
        theta = (scos / self.s).clamp_(-1.0, 1.0).acos_()
        theta_y = theta[rows, labels]
        # SFace, inter-class re-scaling function: 1 / (1 + e^(k (theta_j - b)))
        weights = theta.sub_(self.b).mul_(-self.k).sigmoid_()
        # SFace, intra-class re-scaling function: 1 / (1 + e^(-k (theta_y - a))), the intra term's sign folded in
        weights[rows, labels] = -torch.sigmoid(self.k * (theta_y - self.a))
        return weights

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        labels = labels.long()
        scos = self.scaled_cosine(embeddings)
        weights = self.rescaling_weights(scos, labels)
        # SFace loss: mean(-w_y s cos theta_y) + mean(sum_{j != y} w_j s cos theta_j), the weights detached
        loss = torch.vdot(weights.flatten(), scos.flatten()) / labels.shape[0]
        return HeadLoss(loss, scos.detach().argmax(1))
