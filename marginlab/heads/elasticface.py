"""ElasticFace (Boutros et al., CVPRW 2022): ArcFace / CosFace with a margin drawn from N(m, std) per sample."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import Tensor

from marginlab.checks import check_float
from marginlab.errors import ConfigError
from marginlab.heads.base import CosineMarginHead
from marginlab.heads.output import HeadLoss
from marginlab.heads.probe import ProbeMargin

#: the margin's geometry: ElasticFace-Arc (cos(theta_y + m_i)) or ElasticFace-Cos (cos theta_y - m_i)
VARIANTS = ("arc", "cos")
#: how ElasticFace+ pairs the sorted margin draws with the samples (see ElasticFaceHead)
PAIRINGS = ("official", "paper")
#: the official config's (m, std) per (variant, plus); s is 64 for all four
#: (fdbtrs/ElasticFace config/config.py @ 5496ec0643bfdcd5e6b53b885aa4e919e26ce442)
OFFICIAL_M_STD = {
    ("arc", False): (0.50, 0.05),
    ("arc", True): (0.50, 0.0175),
    ("cos", False): (0.35, 0.05),
    ("cos", True): (0.35, 0.02),
}


class ElasticFaceHead(CosineMarginHead):
    """Target logit ``s cos(theta_y + m_i)`` (``variant="arc"``) or ``s (cos theta_y - m_i)`` (``"cos"``), the other
    logits ``s cos theta_j``, with a fresh margin ``m_i ~ N(m, std)`` for every sample of every training step.

    Ported from fdbtrs/ElasticFace utils/losses.py (``ElasticArcFace``, ``ElasticCosFace``) at commit
    5496ec0643bfdcd5e6b53b885aa4e919e26ce442; its D x C ``kernel`` is our ``weight`` transposed (C x D), drawn
    N(0, 0.01^2) as there (``init=official``). As there, the arc variant has no threshold and no fallback
    (theta_y + m_i may pass pi) and its gradient is the exact one, ``cos m_i + cos theta sin m_i / sin theta``
    (sin theta floored at 1e-6, where the official acos gives an infinite slope at cos = +-1).

    The margins: each training step draws B values ``torch.normal(m, std, (B, 1))`` in float32, as the official
    code does, from the head's own CPU generator reseeded from (``seed``, rank, ``step``); ``step`` is a buffer (in the
    state dict) counting the training forwards, so a resumed run draws the margins the uninterrupted run would
    have drawn, on any device. ``seed`` null takes the run's ``seed`` (builders.py). The margins applied in the
    last training step are kept, in batch order, as ``last_margins`` (B, float32). Evaluation forwards with
    labels draw nothing and apply the mean margin m.

    ``plus=True`` is ElasticFace+: the draws are sorted (ascending) and handed out by the samples' target cosines,
    sorted descending (``order``: the sample indices from the largest cosine down). The paper's pairing
    (``plus_pairing="paper"``) gives the sample of the k-th largest cosine the k-th smallest margin:
    ``m[order] = sorted``, a scatter. The official code (``plus_pairing="official"``, the default) writes
    ``margin[idicate_cosie]``, i.e. ``m = sorted[order]``, a gather: sample i gets the draw of rank ``order[i]``
    (the index of the sample with the i-th largest cosine), not the draw of its own rank; the two agree only when
    ``order`` is its own inverse. (On torch 2.x the official line itself raises "Index tensor must have the same
    number of dimensions as src tensor": ``margin[idicate_cosie]`` is B x 1 x 1; we take the values it gathers.)

    Partial FC is refused: each sample's margin is drawn for the batch rows of one rank, which the sharded
    classes do not follow. The chunked loss (``chunked``) applies the same margins.
    """

    # fdbtrs/ElasticFace utils/losses.py: nn.init.normal_(self.kernel, std=0.01)
    official_init = "normal_0.01"
    #: why Partial FC cannot shard this head (distributed/partial_fc.py)
    partial_fc_refusal = "its per-sample margins are drawn for one rank's batch rows; use it without Partial FC"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 64.0,
        m: float | None = None,
        std: float | None = None,
        variant: str = "arc",
        plus: bool = False,
        plus_pairing: str = "official",
        seed: int | None = None,
        **common,
    ):
        if variant not in VARIANTS:
            raise ConfigError(f"variant={variant!r} is not allowed: it must be one of {', '.join(VARIANTS)}")
        if plus_pairing not in PAIRINGS:
            raise ConfigError(f"plus_pairing={plus_pairing!r} is not allowed: it must be one of {', '.join(PAIRINGS)}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"seed={seed!r} is not allowed: it must be an integer >= 0 or null (the run's seed)")
        self.variant = variant
        # additive angular margins take the target cosine in float64 (acos's slope); cosine margins have slope 1
        self.precise_target = variant == "arc"
        super().__init__(in_features, num_classes, s=s, **common)
        self.plus = bool(plus)
        self.plus_pairing = plus_pairing
        default_m, default_std = OFFICIAL_M_STD[(variant, self.plus)]
        high = math.pi / 2 if variant == "arc" else 2.0
        self.m = check_float("m", default_m if m is None else m, low=0.0, high=high)
        self.std = check_float("std", default_std if std is None else std, low=0.0, high=1.0)
        self.seed = seed
        self.probe_margin = ProbeMargin(m2=self.m) if variant == "arc" else ProbeMargin(m3=self.m)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))  # training forwards so far
        #: the margins of the last training step, in batch order (B, float32); None before the first
        self.last_margins: Tensor | None = None
        self._generator = torch.Generator()  # CPU: the same draws on every device
        self._armed = False  # a training forward is running: its first margin call draws

    def generator_seed(self, step: int, rank: int = 0) -> int:
        """The seed of step ``step``'s draws on rank ``rank``: a function of (seed, rank, step) only, so a resumed run
        redraws them (as Partial FC's ``sample``); the ranks of a torchrun draw for their own samples."""
        return (((0 if self.seed is None else self.seed) * 1_000_003 + int(rank)) * 1_000_003 + int(step)) % 2**63

    @contextlib.contextmanager
    def _drawing(self, labels: Tensor | None):
        """Arms the margin draw for a training forward with labels (the outermost call of a nested one)."""
        arm = labels is not None and self.training and not self._armed
        self._armed = self._armed or arm
        try:
            yield
        finally:
            if arm:
                self._armed = False

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, *, stats: bool = False) -> Tensor | HeadLoss:
        with self._drawing(labels):
            return super().forward(embeddings, labels, stats=stats)

    def chunked_loss(self, embeddings, labels, weight=None, reduce=None, *, stats: bool = False) -> HeadLoss:
        with self._drawing(labels):  # (MarginLoss may call it without the forward)
            return super().chunked_loss(embeddings, labels, weight, reduce, stats=stats)

    @torch.no_grad()
    def draw_margins(self, cos_target: Tensor) -> Tensor:
        """This step's B margins, in batch order (advances ``step``); ElasticFace+ pairs them with ``cos_target``."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self._generator.manual_seed(self.generator_seed(self.step.item(), rank))
        self.step.add_(1)
        # ElasticFace: m_i ~ N(m, std), drawn as the official torch.normal(mean=m, std=std, size=(B, 1)) (float32)
        margin = torch.normal(self.m, self.std, size=(cos_target.shape[0], 1), generator=self._generator)
        margin = margin.to(cos_target.device)
        if self.plus:
            # ElasticFace+: sort the draws ascending and the target cosines descending, then pair them
            _, order = torch.sort(cos_target.detach().reshape(-1, 1), dim=0, descending=True)
            margin, _ = torch.sort(margin, dim=0)
            if self.plus_pairing == "official":
                margin = margin[order.view(-1)]  # official: gathered with the sort order (margin[idicate_cosie])
            else:
                paired = torch.empty_like(margin)
                paired[order.view(-1)] = margin  # the paper: the k-th largest cosine gets the k-th smallest draw
                margin = paired
        self.last_margins = margin.reshape(-1).detach().clone()
        return margin.reshape(-1)

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, Tensor | float]:
        if self._armed:
            self._armed = False  # one draw per training forward
            margin = self.draw_margins(cos_target).to(cos_target.dtype)
        else:  # evaluation with labels, the margin advisor: the mean margin
            margin = torch.full_like(cos_target, self.m)
        if self.variant == "cos":
            return cos_target - margin, 1.0  # ElasticFace-Cos: s (cos theta_y - m_i)
        # ElasticFace-Arc: s cos(theta_y + m_i) = s (cos theta_y cos m_i - sin theta_y sin m_i), no threshold
        one_minus = 1.0 - cos_target * cos_target
        sin = one_minus.clamp_min(1e-12).sqrt()
        cos_m, sin_m = torch.cos(margin), torch.sin(margin)
        # d/dcos: cos m_i + cos theta sin m_i / sin theta (0 for the floor's part)
        slope = cos_m + cos_target * sin_m / sin * (one_minus >= 1e-12)
        return cos_target * cos_m - sin * sin_m, slope
