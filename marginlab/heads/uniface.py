"""UniFace (Zhou et al., ICCV 2023): the unified cross-entropy (UCE) loss, a binary logistic loss per class around
one learnable threshold b. A loss of its own."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from marginlab.checks import check_float
from marginlab.errors import ConfigError
from marginlab.heads.base import MarginHead
from marginlab.heads.kernels import fused_linear, normalize_features
from marginlab.heads.output import HeadLoss
from marginlab.heads.probe import ProbeMargin

#: what ``bias`` may be: one b for every class (UCE) or one per class (the official Normalized_BCE_Loss)
BIASES = ("shared", "per_class")
#: softplus is log1p(exp(z)) up to here and z above it: equal to rounding in float32, < 1e-13 off in float64, and
#: no overflow for any s (the official log(1 + exp(z)) overflows float32 for s > 88)
SOFTPLUS_LINEAR_ABOVE = 30.0


class UniFaceHead(MarginHead):
    """The UCE loss with its cosine margin (UniFace; official head.py):

    ``L = log(1 + exp(-clamp(s (cos theta_y - m) - b))) + l * sum_{j != y} log(1 + exp(clamp(s cos theta_j - b)))``

    summed over the classes of each sample and averaged over the batch, the clamp to [-s, s] as in the official code
    (whose gradient is 0 outside it). ``b`` is an ``nn.Parameter`` initialised to log(C r 10) (official head.py);
    ``bias=per_class`` gives every class its own b_j, all with that initial value (the official Normalized_BCE_Loss,
    the paper's "NBCE" baseline); ``bias=shared`` is UCE (Unified_Cross_Entropy_Loss). ``l`` is the paper's lambda,
    the weight of the negative terms.

    ``r`` < 1 samples the classes of each training step as the official train.py does: every class of the batch plus
    random others up to int(C r) (official: the positives may be dropped when they alone exceed int(C r); here they
    never are, as Partial FC keeps them). The draw is reseeded per step from (``seed``, the ``step`` buffer), so a
    resumed run samples what the uninterrupted one would; the training accuracy is then over the sampled classes.
    The official train.py also freezes the SGD momentum of unsampled rows (its ``weight_mom`` buffer); marginlab's
    optimizer does not (Partial FC v2's choice). Partial FC (``head.partial_fc``) and the chunked loss are refused:
    the loss is not a softmax cross-entropy, and b's gradient sums over every class.

    Ported from CVI-SZU/UniFace head.py (``Unified_Cross_Entropy_Loss``, ``Normalized_BCE_Loss``) and train.py
    (the class sampling), commit 00ade47075e26f24a96a1db718046b9af5f068ea; the official D x C ``weight`` is already
    C x D there, ``bias`` is named ``b`` here. Differences: features and weights are normalised with marginlab's
    floor (``normalize_features``; official F.normalize eps 1e-5), which differs only for norms below 1e-5.
    Evaluation scores (``head(x)``): each class's binary logit s cos theta_j - b_j (argmax: that of cos theta_j
    with a shared b). b starts at log(C r 10) whatever s is, so s sets the starting threshold b / s: with 10 classes
    in 2-D (neighbours at cos 36 deg = 0.81) s 5 (b / s = 0.92) trains, s 8 and above collapse to a few classes.
    """

    # CVI-SZU/UniFace head.py: nn.init.kaiming_normal_(weight, a=1, mode='fan_in', nonlinearity='leaky_relu')
    official_init = "kaiming_normal_fan_in"
    produces_loss = True
    normalized_features = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float = 0.4,
        l: float = 1.0,  # noqa: E741 (the official name of lambda)
        r: float = 1.0,
        bias: str = "shared",
        seed: int = 0,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        self.s = check_float("s", s, low=0.0, low_inclusive=False)
        self.m = check_float("m", m, low=0.0, high=2.0)
        self.l = check_float("l", l, low=0.0, low_inclusive=False)
        self.r = check_float("r", r, low=0.0, high=1.0, low_inclusive=False)
        if bias not in BIASES:
            raise ConfigError(f"bias={bias!r} is not allowed: it must be one of {', '.join(BIASES)}")
        self.bias = bias
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed={seed!r} is not allowed: it must be an integer >= 0")
        self.seed = seed
        # UniFace head.py: nn.init.constant_(bias, math.log(out_features * r * 10))
        self.b = nn.Parameter(torch.full((num_classes if bias == "per_class" else 1,), math.log(num_classes * r * 10)))
        # training forwards so far: the classes sampled at a step depend on (seed, step) only (r < 1)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.num_sample = max(1, int(num_classes * self.r))  # official train.py: int(num_classes * r)
        self._generator: torch.Generator | None = None
        # the positive threshold is m above the negative one (cos theta_y - m vs cos theta_j): CosFace's cosine margin
        self.probe_margin = ProbeMargin(m3=self.m)

    # ---- the class sample (r < 1) ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, labels: Tensor) -> Tensor | None:
        """Sorted class indices of this step (None: every class): the batch's classes plus random others up to
        ``num_sample`` (official train.py: topk of a random permutation with the positives set first)."""
        if self.num_sample >= self.num_classes:
            return None
        positives = torch.unique(labels)
        if self.num_sample <= positives.numel():
            return positives
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        # reseeded every step (as distributed/partial_fc.py): a resumed run draws what the uninterrupted one drew
        self._generator.manual_seed((self.seed * 1_000_003 + int(self.step)) % 2**63)
        score = torch.rand(self.num_classes, device=device, generator=self._generator)
        score[positives] = 2.0  # positives first
        return score.topk(self.num_sample).indices.sort().values

    # ---- the head contract -------------------------------------------------------------------------------------
    def scaled_cosine(self, embeddings: Tensor, classes: Tensor | None = None) -> Tensor:
        """s cos theta_j (B x n) for the given classes (all when None), in one fused product clamped to [-s, s]."""
        weight = self.weight if classes is None else self.weight[classes]
        return fused_linear(normalize_features(embeddings) * self.s, weight, normalize_weight=True, bound=self.s).logits

    def class_bias(self, classes: Tensor | None) -> Tensor:
        """b_j of the given classes (all when None); the one shared b broadcasts."""
        return self.b if classes is None or self.bias == "shared" else self.b[classes]

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        """The evaluation scores s cos theta_j - b_j (B x C): each class's binary logit without the margin."""
        scos = self.scaled_cosine(embeddings)
        return scos - self.b.to(scos.dtype)

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        labels = labels.long()
        classes = self.sample(labels) if self.training else None
        if self.training:
            self.step += 1
        columns = labels if classes is None else torch.searchsorted(classes, labels)  # each row's target column
        scos = self.scaled_cosine(embeddings, classes)
        b = self.class_bias(classes).to(scos.dtype)
        s, threshold = self.s, SOFTPLUS_LINEAR_ABOVE
        # UniFace UCE (head.py cos_m_theta_n): negative term l log(1 + e^(s cos theta_j - b)), z clamped to [-s, s]
        z = scos - b
        negative = F.softplus(z.clamp(-s, s), threshold=threshold)
        rows = torch.arange(labels.shape[0], device=labels.device)
        scos_y = scos[rows, columns]
        b_y = b if b.numel() == 1 else b[columns]
        # UniFace UCE with margin (head.py cos_m_theta_p): positive term log(1 + e^-(s (cos theta_y - m) - b)), clamped
        positive = F.softplus(-(scos_y - s * self.m - b_y).clamp(-s, s), threshold=threshold)
        # the row's sum over j != y: all negative terms less the target's, plus the positive (head.py one_hot mix)
        per_row = self.l * (negative.sum(1) - negative[rows, columns]) + positive
        best = z.detach().argmax(1)  # the largest binary logit s cos theta_j - b_j
        predicted = best if classes is None else classes[best]
        return HeadLoss(per_row.mean(), predicted)

    def schedule_values(self) -> dict[str, float]:
        """The learnt threshold b (its mean over the classes with ``bias=per_class``)."""
        return {"b": float(self.b.detach().mean())}
