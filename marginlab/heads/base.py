"""The head contract shared by every margin head.

A head owns the class weights ``W`` (C x D). Its training forward ``head(x, labels)`` returns either the B x C
margin logits (the margin on the target column only; the criterion in marginlab/losses applies cross-entropy)
or, for a head that ``produces_loss`` and for a ``chunked`` cosine-margin step that never builds the logits, a
``HeadLoss(loss, predicted, stats)`` (heads/output.py). ``head(x)`` gives the plain evaluation logits, and
``cosine(x)`` the pure, margin-free cosines that evaluation and the geometry probe read (heads/probe.py, with
``normalized_features``, ``weights_are_points`` and ``probe_margin``); a head keeps no probe state.
Margins are applied by gathering the target cosine, transforming it and scattering it back; no head
builds a B x C one-hot or takes ``acos`` of the whole B x C matrix. Margin arithmetic runs in float32
even under autocast.
"""

from __future__ import annotations

import inspect
import logging
import math
from typing import Literal

import torch
from torch import Tensor, nn

from marginlab.checks import check_batch, check_float, check_positive_int
from marginlab.errors import ConfigError
from marginlab.heads.kernels import (
    ChunkedMargin,
    RowReduce,
    chunked_margin_cross_entropy,
    fused_cosine_margin,
    fused_linear,
    normalize_features,
    precise_cosine,
    with_slope,
)
from marginlab.heads.output import HeadLoss, HeadScores, StepStats
from marginlab.heads.probe import ProbeMargin, logit_stats, scaled_cosine, unfloored

log = logging.getLogger(__name__)


def cos_plus_angle(cos: Tensor, cos_m, sin_m) -> Tensor:
    """cos(theta + m) from cos(theta) without acos; cos_m/sin_m are floats or tensors broadcasting to cos.

    sin(theta) is taken as sqrt(max(1 - cos^2, 1e-12)) so the gradient stays finite at cos = +-1.
    """
    sin = torch.sqrt((1.0 - cos * cos).clamp_min(1e-12))
    # ArcFace eq. 3 / angle-sum identity: cos(theta + m) = cos theta cos m - sin theta sin m
    return cos * cos_m - sin * sin_m


def cos_plus_angle_and_slope(cos: Tensor, cos_m: float, sin_m: float) -> tuple[Tensor, Tensor]:
    """``cos_plus_angle`` and its derivative in cos, ``cos m + cos sin m / sin``, for fixed m.

    Where ``1 - cos^2`` is floored at 1e-12 the floor's gradient is 0, so the slope there is cos m.
    """
    one_minus = 1.0 - cos * cos
    sin = one_minus.clamp_min(1e-12).sqrt_()
    # d/dcos [cos cos m - sin theta sin m] = cos m + cos sin m / sin theta  (d sin / d cos = -cos / sin)
    slope = torch.addcdiv(torch.full_like(cos, cos_m), cos * (one_minus >= 1e-12), sin, value=sin_m)
    return cos * cos_m - sin * sin_m, slope


#: what ``chunked`` may be (CosineMarginHead): never, every training step, or the steps whose logits are large
CHUNKED = (False, True, "auto")
#: ``chunked="auto"`` chunks a training step when its B x C logits in float32 would take at least this many bytes:
#: 1 GiB, B = 256 x C = 1M classes. The unfused head holds several B x C buffers (the logits, their softmax and
#: its gradient), so at 1 GiB each they cost GiBs beside the backbone's activations, worth the chunked loss's
#: 1.2-1.35x step time (README, benchmarks/chunked_loss.py); every shipped config stays far below it (CASIA:
#: 256 x 10,572 = 10.8 MB), so it keeps their runs unchanged.
CHUNKED_AUTO_BYTES = 1 << 30

#: what ``init`` may be: the head's own official initialisation of W, or nn.Linear's (kaiming)
INITS = ("official", "kaiming")
#: the initialisations of W a head can declare as its official one (see ``fill_class_weight_``)
WEIGHT_INITS = (
    "kaiming_uniform",
    "normal_0.01",
    "uniform_unit_rows",
    "gaussian_unit_rows",
    "caffe_xavier",
    "caffe_msra",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_normal_fan_in",
    "xavier_normal_out_gain2",
    "normal_1",
    "kaiming_normal_fan_out",
    "kaiming_uniform_fan_out",
)


@torch.no_grad()
def fill_class_weight_(
    weight: Tensor, kind: str, generator: torch.Generator | None = None, total_rows: int | None = None
) -> Tensor:
    """Fills ``weight`` (rows x D) in place with the initialisation ``kind`` (one of WEIGHT_INITS).

    Every kind but the xavier and ``*_fan_out`` ones draws rows independently of the row count, so a shard of rows
    can be drawn chunk by chunk (Partial FC); ``total_rows`` is the full row count for their fan_out.
    """
    dim = weight.shape[1]
    if kind == "kaiming_uniform":
        # nn.Linear's default: kaiming_uniform(a = sqrt 5) = U(-1/sqrt(D), 1/sqrt(D)); row norm ~0.58
        return nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
    if kind == "normal_0.01":
        return weight.normal_(0.0, 0.01, generator=generator)  # N(0, 0.01^2) per entry
    if kind == "caffe_xavier":  # Caffe XavierFiller (variance_norm FAN_IN, fan_in = D): U(-sqrt(3/D), sqrt(3/D))
        bound = math.sqrt(3.0 / dim)
        return weight.uniform_(-bound, bound, generator=generator)
    if kind == "caffe_msra":  # Caffe MSRAFiller (FAN_IN): N(0, 2/D)
        return weight.normal_(0.0, math.sqrt(2.0 / dim), generator=generator)
    if kind == "xavier_uniform":  # torch xavier_uniform_: U(-a, a), a = sqrt(6 / (D + rows))
        bound = math.sqrt(6.0 / (dim + (weight.shape[0] if total_rows is None else total_rows)))
        return weight.uniform_(-bound, bound, generator=generator)
    if kind == "xavier_normal":  # torch xavier_normal_: N(0, 2 / (D + rows)), symmetric in the two fans
        std = math.sqrt(2.0 / (dim + (weight.shape[0] if total_rows is None else total_rows)))
        return weight.normal_(0.0, std, generator=generator)
    if kind == "kaiming_normal_fan_in":  # kaiming_normal_(a=1, mode='fan_in', leaky_relu): gain 1, N(0, 1/D)
        return weight.normal_(0.0, 1.0 / math.sqrt(dim), generator=generator)
    if kind == "xavier_normal_out_gain2":  # SFace's xavier_normal_(gain=2, mode='out'): N(0, (2 sqrt(2 / rows))^2)
        rows = weight.shape[0] if total_rows is None else total_rows
        return weight.normal_(0.0, 2.0 * math.sqrt(2.0 / rows), generator=generator)
    if kind == "normal_1":  # torch.nn.init.normal_: N(0, 1) per entry
        return weight.normal_(0.0, 1.0, generator=generator)
    rows = weight.shape[0] if total_rows is None else total_rows
    if kind == "kaiming_normal_fan_out":  # kaiming_normal_(mode="fan_out") of rows x D: N(0, 2/rows)
        return weight.normal_(0.0, math.sqrt(2.0 / rows), generator=generator)
    if kind == "kaiming_uniform_fan_out":  # kaiming_uniform_(a = sqrt 5) of the D x rows kernel: U(+-1/sqrt(rows))
        bound = 1.0 / math.sqrt(rows)
        return weight.uniform_(-bound, bound, generator=generator)
    if kind == "uniform_unit_rows":  # uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5) on the D x C kernel
        weight.uniform_(-1.0, 1.0, generator=generator)
    elif kind == "gaussian_unit_rows":  # Caffe GaussianUnitBallFiller: N(0, 1), then each row to unit norm
        weight.normal_(0.0, 1.0, generator=generator)
    else:
        raise ConfigError(f"weight init {kind!r} is not known: it must be one of {', '.join(WEIGHT_INITS)}")
    return weight.div_(torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min_(1e-12))


class MarginHead(nn.Module):
    """Base of every head: owns ``weight`` (C x D) and checks inputs; subclasses implement ``logits``.

    Keys every head takes (subclasses pass them on through ``**common``):

    - ``init``: ``official`` (default) draws W as the head's official code does (``official_init``,
      each head cites its source); ``kaiming`` is nn.Linear's kaiming_uniform(a = sqrt 5), U(+-1/sqrt D).
    - ``lr_mult`` (default 1) and ``weight_decay`` (default null: ``trainer.head_weight_decay``, else the
      optimizer's): the learning-rate multiplier and weight decay of the class weights ``weight``, as a
      Caffe ``param { lr_mult decay_mult }``; the optimizer builder (builders.py) makes them a group.
    """

    #: for the geometry probe (heads/probe.py): whether the head classifies normalised features,
    #: whether its class weights are points in feature space (not directions), and the margin its
    #: violation count uses (heads with a margin set their own, in ``__init__`` when it depends on m)
    normalized_features: bool = False
    weights_are_points: bool = False
    probe_margin: ProbeMargin = ProbeMargin()
    #: whether its cosines are of ``normalize_features``' floored feature x / max(||x||, FEATURE_EPS), which
    #: ``cosine`` gives as those of x / ||x|| (heads/probe.py, ``unfloored``)
    probe_floored: bool = False
    #: the initialisation of W in the head's official code (one of WEIGHT_INITS); heads without an
    #: official code of their own keep nn.Linear's
    official_init: str = "kaiming_uniform"
    #: the head is a loss of its own (heads/output.py): ``head(x, labels)`` returns ``self.loss(x, labels)``, a
    #: ``HeadLoss``, instead of margin logits; ``head(x)`` still gives its evaluation scores
    produces_loss: bool = False
    #: why the chunked cross-entropy (``head.chunked``: a softmax cross-entropy over s cos theta in class blocks,
    #: CosineMarginHead) is not available for the head; None: it may be (``why_not_chunked`` reads it; a loss of its
    #: own needs none: ``produces_loss`` says why)
    chunked_refusal: str | None = "its logits are not s cos theta with a margin on the target cosine"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        init: str = "official",
        lr_mult: float = 1.0,
        weight_decay: float | None = None,
    ):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.num_classes = check_positive_int("num_classes", num_classes)
        if init not in INITS:
            raise ConfigError(
                f"init={init!r} is not allowed: it must be one of {', '.join(INITS)} "
                f"(official for {type(self).__name__} is {self.official_init})"
            )
        self.init = init
        self.lr_mult = check_float("lr_mult", lr_mult, low=0.0, low_inclusive=False)
        self.weight_decay = None if weight_decay is None else check_float("weight_decay", weight_decay, low=0.0)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_weight()

    @property
    def weight_init(self) -> str:
        """The initialisation ``init`` selects: ``official_init``, or ``kaiming_uniform``."""
        return self.official_init if self.init == "official" else "kaiming_uniform"

    def reset_weight(self, generator: torch.Generator | None = None) -> None:
        """Draws ``weight`` afresh with ``weight_init`` (subclasses that reshape W call it again)."""
        fill_class_weight_(self.weight, self.weight_init, generator)

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, *, stats: bool = False) -> Tensor | HeadLoss:
        """The training output (logits, or a ``HeadLoss``) with labels, the evaluation logits without. ``stats``:
        this step logs geometry (a head that computes its step statistics on the way returns them in its
        ``HeadLoss``; the criterion asks ``cosine`` for the others)."""
        self._check_inputs(embeddings, labels)
        if labels is not None and self.produces_loss:
            return self.loss(embeddings, labels)
        return self.logits(embeddings, labels)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        raise NotImplementedError

    def loss(self, embeddings: Tensor, labels: Tensor) -> HeadLoss:
        """The training loss of a head that ``produces_loss`` (its mean over the batch, + predictions)."""
        raise NotImplementedError(f"{type(self).__name__} produces logits, not a loss of its own")

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        """The B x C cosines of the head's geometry, margin-free and detached: what the probe and evaluation read.
        A pure method (no state): the normalised cosine unless a head defines its own (of x / ||x|| also below
        the feature floor when ``probe_floored``)."""
        cos = self.normalized_cosine(embeddings)
        return unfloored(cos, embeddings) if self.probe_floored else cos

    def cosine_of_logits(self, logits: Tensor, embeddings: Tensor) -> Tensor | None:
        """The pure cosines (``cosine``) of plain logits: any columns of the rows of ``head(embeddings)``, by a map
        increasing within each row (``logit_stats``: evaluation and the probe then read the forward's logits);
        None when the head's logits are no such map of its cosines (they ask ``cosine``)."""
        return None

    # ---- helpers for subclasses -------------------------------------------------------------
    def normalized_cosine(self, embeddings: Tensor) -> Tensor:
        """cos(theta_j) = <x/||x||, W_j/||W_j||>, B x C, float32 (matmul may run under autocast).

        float64 stays float64 (gradcheck); half and bfloat16 are promoted to float32.
        """
        # fused: x/||x|| . W_j divided by ||W_j||, without materialising normalize(W) (fast_cosine.py)
        return fused_linear(normalize_features(embeddings), self.weight, normalize_weight=True, bound=1.0).logits

    def cosine_and_target(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(cos theta_j (B x C), cos theta_y (B)), both differentiable, for heads that edit the cosines
        with ordinary ops. The target cosines are taken in float64 from the B target rows
        (``precise_cosine``, as ArcFace's fused path does): under bf16/fp16 autocast the product's
        target entry is off by up to ~1e-2, i.e. logits at s = 64 for small angles, where acos's slope
        is large. The target entries of the B x C matrix still hold the product's value: overwrite them.
        """
        fused = fused_linear(
            normalize_features(embeddings),
            self.weight,
            labels,
            normalize_weight=True,
            bound=1.0,
            target_value=precise_cosine(embeddings, self.weight, labels),
        )
        return fused.logits, fused.target

    @staticmethod
    def replace_target(logits: Tensor, labels: Tensor, target_logit: Tensor) -> Tensor:
        """Writes the target column (B) into logits (B x C) in place; autograd-safe for fresh tensors."""
        return logits.scatter_(1, labels.view(-1, 1), target_logit.view(-1, 1).to(logits.dtype))

    def extra_loss(self) -> Tensor | None:
        """A loss term the head adds itself (e.g. MagFace's g); None for most heads."""
        return None

    def schedule_values(self) -> dict[str, float]:
        """Values worth logging that change during training (annealing lambda, learnable scale)."""
        return {}

    def _check_inputs(self, embeddings: Tensor, labels: Tensor | None) -> None:
        check_batch(type(self).__name__, self.in_features, embeddings, labels)

    def extra_repr(self) -> str:
        """``in_features=512, num_classes=10572, s=64.0, m=0.5, ...``: every constructor argument the head keeps
        as a plain value (a learnt scalar such as NormFace's s as its current value), so a printed head says
        which margin it applies."""
        names = [
            p for c in type(self).__mro__ if "__init__" in vars(c) for p in inspect.signature(c.__init__).parameters
        ]
        shown = {}
        for name in dict.fromkeys(n for n in names if n not in ("self", "args", "kwargs", "common")):
            value = getattr(self, name, None)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = round(float(value.detach()), 6)
            if isinstance(value, (bool, int, float, str)):
                shown[name] = value
        return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in shown.items())


class CosineMarginHead(MarginHead):
    """Normalised features and weights: logits s * cos(theta_j), the target replaced by s * phi(cos theta_y).

    Subclasses implement ``margin_and_slope``: phi and its derivative on the B target cosines
    (NormFace: the identity, slope 1). A training forward then runs as one fused Function with a
    hand-written backward (fused_margin.py); ``target_cosine`` offers phi as an autograd expression
    to heads and wrappers that edit the cosines with ordinary ops (sub-centres, Partial FC).
    """

    normalized_features = True  # it classifies x / ||x|| (heads/probe.py)
    chunked_refusal = None  # (a subclass may still be unchunkable: ``chunkable_problem``)
    probe_floored = True  # its cosines are of normalize_features' x / max(||x||, FEATURE_EPS)
    #: its ``normalized_cosine`` is the max over each class's weight rows (Sub-center ArcFace), which the chunked
    #: loss computes itself (``sub_centers``); any other override of it refuses ``chunked``
    chunked_max_pools_sub_centers: bool = False
    #: take the target cosines in float64 from the target rows (angular margins: acos's slope is
    #: unbounded at +-1); additive cosine margins (slope 1) take them from the float32 product
    precise_target: bool = True

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        s: float = 30.0,
        chunked: bool | Literal["auto"] = False,
        chunk_size: int | None = None,
        chunked_above_bytes: int = CHUNKED_AUTO_BYTES,
        **common,
    ):
        super().__init__(in_features, num_classes, **common)
        self.s = check_float("s", s, low=0.0, low_inclusive=False)
        #: ``chunked``: a training forward (with labels, in train mode) returns the mean cross-entropy itself
        #: (a ``HeadLoss``, heads/output.py, with each row's predicted class), computed in blocks of ``chunk_size``
        #: classes (default: ``default_block`` in that module) with an online log-sum-exp, never the B x C logits
        #: (kernels/chunked_margin_ce.py): peak memory dW plus a few B x block blocks, one more B x C x D
        #: product. On the steps whose geometry the probe logs (``stats``), the blocks also give the two
        #: B-vectors its step statistics read, cos theta_y and the nearest non-target cosine (``StepStats``).
        #: ``"auto"``: only the training steps whose B x C float32 logits take at least ``chunked_above_bytes``
        #: (``chunks``); a head that cannot be chunked then never chunks, and says so once in the log.
        if not (chunked is True or chunked is False or (isinstance(chunked, str) and chunked in CHUNKED)):
            raise ConfigError(f"chunked={chunked!r} is not allowed: it must be true, false or auto")
        self.chunked = chunked
        self.chunk_size = None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        self.chunked_above_bytes = check_positive_int("chunked_above_bytes", chunked_above_bytes)
        #: why ``chunked="auto"`` never chunks this head (None: it may): set once, when it is first found
        self.unchunkable: str | None = None
        self._auto_announced = False  # the log line of auto's first chunked step is written
        if self.chunked is True:
            check_chunkable(self)
        elif self.chunked == "auto" and chunkable_problem(type(self)):
            self.keep_unchunked(chunkable_problem(type(self)))

    def forward(
        self, embeddings: Tensor, labels: Tensor | None = None, *, stats: bool = False
    ) -> Tensor | HeadLoss | HeadScores:
        if not self.chunked_step(labels):
            if stats and labels is not None and self.reads_own_cosines:
                self._check_inputs(embeddings, labels)
                logits, target = self._margin_logits(embeddings, labels)
                # the step statistics off this forward's cosines: no second B x C x D product (heads/output.py)
                return HeadScores(logits, logit_stats(self, logits, embeddings, labels, target))
            return super().forward(embeddings, labels)
        self._check_inputs(embeddings, labels)
        return self.chunked_loss(embeddings, labels, stats=stats)  # never the B x C logits (``chunked``)

    def chunked_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        weight: Tensor | None = None,
        reduce: RowReduce | None = None,
        *,
        stats: bool = False,
    ) -> HeadLoss:
        """The mean cross-entropy of ``head(x, labels)``'s logits, in class blocks (kernels/chunked_margin_ce.py),
        with each row's predicted class and, with ``stats``, the probe's step statistics.

        Partial FC passes its sampled rows as ``weight``, -1 in ``labels`` for classes other ranks hold and
        its all-reduce as ``reduce``: no rank scores every class, so no predictions and no statistics."""
        check_chunkable(self)
        # the probe's step statistics need two B-vectors, which the blocks give (not over ranks: Partial FC)
        record = {} if stats and reduce is None else None
        loss, predicted = _chunked_loss(
            embeddings,
            self.weight if weight is None else weight,
            labels,
            self.s,
            self.chunked_margin(embeddings),
            self.precise_target,
            self.chunk_size,
            reduce,
            self.sub_centers,
            record,
        )
        if record is None:
            return HeadLoss(loss, predicted)
        # the blocks' cosines are of the floored feature: read as those of x / ||x||, as ``cosine`` gives them
        target, other = (unfloored(record[k].detach(), embeddings) for k in ("target", "nearest_other"))
        return HeadLoss(loss, predicted, StepStats(target, other))

    @property
    def sub_centers(self) -> int:
        """Weight rows per class: k for Sub-center ArcFace, else 1."""
        return self.weight.shape[0] // self.num_classes

    def chunked_step(self, labels: Tensor | None) -> bool:
        """Whether this forward returns the chunked loss: a training forward with labels that ``chunks``."""
        return labels is not None and self.training and self.chunks(labels.shape[0])

    def chunks(self, batch_rows: int, class_rows: int | None = None) -> bool:
        """Whether a training step scoring ``batch_rows`` x ``class_rows`` weight rows (default: all of ``weight``,
        k per class with sub-centres; Partial FC passes its sample's) is chunked: always with ``chunked=True``;
        with ``"auto"`` when the head can be chunked and those logits in float32 take at least
        ``chunked_above_bytes``. It depends on the two sizes alone, so a resumed run decides as the first did."""
        if self.chunked is True:
            return True
        if self.chunked != "auto" or self.unchunkable is not None:
            return False
        class_rows = self.weight.shape[0] if class_rows is None else class_rows
        size = batch_rows * class_rows * 4  # bytes of the B x C float32 logits
        if size < self.chunked_above_bytes:
            return False
        if not self._auto_announced:
            _announce_auto(self, batch_rows, class_rows, size)
        return True

    def keep_unchunked(self, reason: str) -> None:
        """``chunked="auto"`` never chunks this head from now on (``reason``: why), said once in the log."""
        if self.unchunkable is None:
            self.unchunkable = reason
            log.info("%s: head.chunked=auto never chunks it: %s", type(self).__name__, reason)

    def chunked_margin(self, embeddings: Tensor) -> ChunkedMargin:
        """The margin the chunked loss applies (kernels/chunked_margin_ce.py): ``margin_and_slope`` for heads
        whose logits are s cos theta with phi on the target; heads that also need the feature norms, a state
        or the other columns (AdaFace, MagFace, CurricularFace) return their own, making the same training
        side effects (running statistics, MagFace's g) as their ``logits``."""
        return self.margin_and_slope

    def margin_and_slope(self, cos_target: Tensor) -> tuple[Tensor, Tensor | float]:
        """(phi(cos theta_y), d phi / d cos theta_y) for the B target cosines; called without autograd."""
        raise NotImplementedError

    def target_cosine(self, cos_target: Tensor, labels: Tensor) -> Tensor:
        """phi(cos theta_y) (B) as an autograd expression whose gradient is the head's slope."""
        return with_slope(cos_target, self.margin_and_slope)

    def logits(self, embeddings: Tensor, labels: Tensor | None) -> Tensor:
        if type(self).normalized_cosine is not MarginHead.normalized_cosine:  # e.g. sub-centres
            if labels is None:
                return self.normalized_cosine(embeddings) * self.s
            if self.precise_target:  # the target cosines in float64 from the target rows
                cos, cos_target = self.cosine_and_target(embeddings, labels)
            else:
                cos = self.normalized_cosine(embeddings)
                cos_target = cos.gather(1, labels.view(-1, 1)).squeeze(1)
            return self.replace_target(cos * self.s, labels, self.s * self.target_cosine(cos_target, labels))
        if labels is None:
            return self._scaled_cosine(embeddings, None)[0].logits
        return self._margin_logits(embeddings, labels)[0]

    def _margin_logits(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(the training logits, the B target logits s cos theta_y before the margin replaced them)."""
        s = self.s
        if not isinstance(s, Tensor) and not torch.compiler.is_compiling():
            # the whole training forward in one Function (fused_margin.py)
            return fused_cosine_margin(
                embeddings, self.weight, labels, s, s, self.margin_and_slope, self.precise_target
            )
        fused = self._scaled_cosine(embeddings, labels)[0]
        cos_target = fused.target / s
        return fused.replace_target(labels, s * self.target_cosine(cos_target, labels)), fused.target

    @property
    def reads_own_cosines(self) -> bool:
        """Whether its logits are s cos theta with the margin on the target alone (``CosineMarginHead.logits``):
        their cosines are then ``cosine_of_logits`` of them, and a training step's statistics come with them."""
        cls = type(self)
        return cls.logits is CosineMarginHead.logits and cls.normalized_cosine is MarginHead.normalized_cosine

    def _scaled_cosine(self, embeddings: Tensor, labels: Tensor | None):
        """(s cos theta_j in one fused product: (s x/||x||) . W_j / ||W_j||, clamped to [-s, s]; s as of this
        forward, detached: s may be learnt)."""
        s = self.s
        scale = s.detach().clone() if isinstance(s, Tensor) else s
        bound = scale.abs() if isinstance(scale, Tensor) else abs(scale)
        # the target cosines (B) are computed again in float64 from the raw features (see fast_cosine.py)
        target_value = None if labels is None else precise_cosine(embeddings, self.weight, labels) * scale
        fused = fused_linear(
            normalize_features(embeddings) * s,
            self.weight,
            labels,
            normalize_weight=True,
            bound=bound,
            target_value=target_value,
        )
        return fused, scale

    @torch.no_grad()
    def cosine(self, embeddings: Tensor) -> Tensor:
        if not self.reads_own_cosines:
            return super().cosine(embeddings)  # (its evaluation logits are s times these)
        return self.cosine_of_logits(self._scaled_cosine(embeddings, None)[0].logits, embeddings)

    @torch.no_grad()
    def cosine_of_logits(self, logits: Tensor, embeddings: Tensor) -> Tensor | None:
        if not self.reads_own_cosines:
            return None
        # the evaluation logits over s, bit for bit: s x/||x|| . W_j/||W_j|| / s (s > 0: increasing)
        s = self.s
        scale = s.detach() if isinstance(s, Tensor) else s
        return unfloored(scaled_cosine(logits, col_scale=1.0 / scale), embeddings)


def chunkable_problem(cls: type) -> str | None:
    """Why a head class's loss cannot be chunked (None: it can): the chunked loss needs logits s cos theta with
    ``margin_and_slope`` on the target cosine, or the head's own ``chunked_margin``."""
    own_margin = cls.chunked_margin is not CosineMarginHead.chunked_margin  # (AdaFace, MagFace, CurricularFace)
    if (
        (cls.margin_and_slope is CosineMarginHead.margin_and_slope and not own_margin)
        or (cls.logits is not CosineMarginHead.logits and not own_margin)
        or (cls.normalized_cosine is not MarginHead.normalized_cosine and not cls.chunked_max_pools_sub_centers)
    ):
        return (
            "its logits are not s cos theta with a margin on the target cosine with at most a transform of the "
            "other cosines (sub-centres take a maximum over each class's centres)"
        )
    return None


def why_not_chunked(cls: type) -> str | None:
    """Why the chunked cross-entropy is not available for a head class (None: it is), in one place: a loss of its
    own has none, another head its declared ``chunked_refusal``, a cosine-margin head its ``chunkable_problem``."""
    if getattr(cls, "produces_loss", False):
        return "it is a loss of its own, not a softmax cross-entropy over the classes"
    refusal = getattr(cls, "chunked_refusal", None)
    if refusal is None and isinstance(cls, type) and issubclass(cls, CosineMarginHead):
        return chunkable_problem(cls)
    return refusal


def chunked_refused(name: str, value, reason: str) -> ConfigError:
    """The one-line refusal of ``chunked=value`` for the head ``name`` (``reason``: ``why_not_chunked``)."""
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    return ConfigError(
        f"chunked={shown} is not allowed with {name}: the chunked cross-entropy is not available for it, as {reason}; "
        "use chunked=false"
    )


def check_chunked_key(cls: type, value) -> None:
    """``head.chunked`` given to a head class that takes no ``chunked`` (config validation): false is its only
    behaviour; anything else is refused in one line saying why."""
    if value is not False:
        raise chunked_refused(getattr(cls, "__name__", str(cls)), value, why_not_chunked(cls) or "it takes no chunked")


def check_chunkable(head: nn.Module) -> None:
    """``chunked=True`` needs a margin that is ``margin_and_slope`` of the target cosine alone and a fixed s."""
    problem = why_not_chunked(type(head))
    if problem is not None:
        raise chunked_refused(type(head).__name__, True, problem)


@torch.compiler.disable
def _announce_auto(head: CosineMarginHead, batch_rows: int, class_rows: int, size: int) -> None:
    """The one log line of ``chunked="auto"``'s first chunked step (eager: a side effect, once)."""
    head._auto_announced = True
    log.info(
        "%s: head.chunked=auto chunks the training steps this large: B=%d x C=%d float32 logits take %d bytes "
        ">= chunked_above_bytes=%d",
        type(head).__name__,
        batch_rows,
        class_rows,
        size,
        head.chunked_above_bytes,
    )


@torch.compiler.disable
def _chunked_loss(embeddings, weight, labels, s, margin, precise, block, reduce, sub_centers, record):
    """(the loss, each row's predicted class: None over ranks). Eager: a Python loop over class blocks, with the
    head's margin passed as a callable."""
    if reduce is not None:  # Partial FC: no rank holds every class, so no prediction
        return chunked_margin_cross_entropy(
            embeddings, weight, labels, s, margin, precise, block, reduce, sub_centers, record
        ), None
    return chunked_margin_cross_entropy(
        embeddings, weight, labels, s, margin, precise, block, reduce, sub_centers, record, return_predicted=True
    )
