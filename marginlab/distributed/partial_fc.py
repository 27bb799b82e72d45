"""Partial FC (An et al., CVPR 2022, "Killing Two Birds with One Stone: Efficient and Robust Training of
Face Recognition CNNs by Partial FC"): class weights sharded over ranks, sampled negatives, a
distributed softmax cross-entropy. The design follows InsightFace arcface_torch's ``PartialFC_V2``.

Rank r owns the classes [start_r, end_r) (``shard_range``) as the weight of an ordinary margin head
built with ``num_classes = end_r - start_r``. Per step every rank
1. all-gathers the embeddings (autograd-aware: the gradient of each rank's embeddings is the sum over
   ranks of the gradients their shards produce) and the labels of the global batch;
2. keeps the classes of the global batch that it owns (positives) and, with ``sample_rate < 1``, a
   random share of the other local classes (negatives): only those rows of the shard get a gradient;
3. computes the B_global x n_sampled cosines, scales them by the head's ``s`` and replaces the target
   column of each sample whose class it owns by ``s * head.target_cosine(cos_target, local_labels)``:
   the margin transform of the local head, so any ``CosineMarginHead`` whose margin acts on the target
   cosine alone works unchanged (NormFace, AM-Softmax/CosFace, ArcFace, combined, sub-center ArcFace);
4. returns the softmax cross-entropy of the global batch over all classes of all ranks
   (``dist_cross_entropy``: all-reduced max and sum of exponentials) as a ``HeadLoss`` (heads/output.py)
   without predictions or step statistics: no rank scores every class.

Without a process group (a plain single-process run) it is one rank owning every class: the collectives
are identities and ``sample_rate < 1`` still samples the negatives.
Checkpoints use the unsharded head's layout (``full_state_dict`` gathers the shards on rank 0,
``load_full_state_dict`` slices them), so a run resumes with any number of ranks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from marginlab.checks import check_float
from marginlab.dtypes import at_least_float32
from marginlab.errors import ConfigError
from marginlab.heads.base import CosineMarginHead, fill_class_weight_
from marginlab.heads.kernels import normalize_features
from marginlab.heads.output import HeadLoss


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the classes rank ``rank`` owns: contiguous shards, the first ``num_classes % world_size``
    ranks one class larger (as InsightFace splits them)."""
    if num_classes < world_size:
        raise ConfigError(
            f"num_classes={num_classes} is not allowed with {world_size} ranks: every rank must own at least one class"
        )
    base, extra = divmod(num_classes, world_size)
    start = base * rank + min(rank, extra)
    return start, start + base + int(rank < extra)


def group_rank_and_size(group=None) -> tuple[int, int]:
    """(rank, world size) of ``group``; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


# ---- collectives with gradients -----------------------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    """Concatenation of every rank's (B x D) tensor; backward: sum of the ranks' gradients of this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group, grad_scale: float) -> Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.clone(memory_format=torch.contiguous_format)  # reduced in place below
        rows = grad.shape[0] // world
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter: all-reduce and keep this rank's rows
            dist.all_reduce(grad, group=ctx.group)
            out = grad[rank * rows : (rank + 1) * rows]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


def all_gather_with_grad(tensor: Tensor, group=None, grad_scale: float = 1.0) -> Tensor:
    """``torch.cat`` of ``tensor`` from every rank (equal shapes), differentiable: the gradient of this rank's
    rows is the sum over ranks of the gradient each computed for them (times ``grad_scale``)."""
    if group_rank_and_size(group)[1] == 1:
        return tensor
    return _AllGather.apply(tensor, group, float(grad_scale))


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor, group=None) -> Tensor:
    if group_rank_and_size(group)[1] == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _DistCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits split by columns over ranks; ``target``: the local column of each
    sample's class, -1 where another rank holds it."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, group) -> Tensor:
        def all_reduce(tensor, op=dist.ReduceOp.SUM):
            if group_rank_and_size(group)[1] > 1:
                dist.all_reduce(tensor, op=op, group=group)

        n = logits.shape[0]
        owned = (target >= 0).nonzero().squeeze(1)
        # log-sum-exp over all ranks' columns: global max, then the global sum of exp(logit - max)
        top = logits.detach().amax(dim=1)
        all_reduce(top, op=dist.ReduceOp.MAX)
        prob = (logits.detach() - top.unsqueeze(1)).exp_()
        total = prob.sum(dim=1)
        all_reduce(total)
        prob.div_(total.unsqueeze(1))  # softmax over all classes, this rank's columns
        target_logit = torch.zeros(n, dtype=logits.dtype, device=logits.device)
        target_logit[owned] = logits.detach()[owned, target[owned]]
        all_reduce(target_logit)  # each sample's target lives on exactly one rank
        ctx.save_for_backward(prob, target, owned)
        ctx.group = group
        # -log softmax_y = log sum_j exp(l_j - max) + max - l_y
        return (total.log() + top - target_logit).mean()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        prob, target, owned = ctx.saved_tensors
        # d mean CE / d l_j = (softmax_j - [j == y]) / B; written into the saved softmax (backward runs once)
        grad = prob
        grad[owned, target[owned]] -= 1.0
        grad.mul_(grad_loss / prob.shape[0])
        return grad, None, None


def dist_cross_entropy(logits: Tensor, target: Tensor, group=None) -> Tensor:
    """Mean cross-entropy of the global batch when each rank holds some columns of the logits (B x C_local).

    ``target``: (B,) the local column of each sample's class, or -1 where the class is on another rank.
    Equal to ``F.cross_entropy(cat(logits of all ranks, dim=1), global labels)``; the gradient is that of
    this rank's columns. The backward pass may run once (it reuses the saved softmax in place).
    """
    return _DistCrossEntropy.apply(logits, target, group)


# ---- the sharded, sampled margin head ----------------------------------------------------------------------
def check_head_class(cls: type) -> None:
    """Partial FC needs a head whose margin is ``target_cosine`` on the plain cosines (see module doc)."""
    name = getattr(cls, "__name__", str(cls))
    if getattr(cls, "produces_loss", False):  # (UniFace, SFace: a sum of per-class terms, not a softmax)
        raise ConfigError(
            f"Partial FC cannot shard {name}: it is a loss of its own, not a softmax cross-entropy over the "
            "classes; use it without Partial FC"
        )
    if not (isinstance(cls, type) and issubclass(cls, CosineMarginHead)):
        raise ConfigError(
            f"Partial FC needs a cosine margin head (normface, amsoftmax/cosface, arcface, combined, x2softmax, "
            f"adacos mode=fixed, subcenter_arcface); {name} is not one"
        )
    refusal = getattr(cls, "partial_fc_refusal", None)  # a head's own reason (ElasticFace's per-sample margins)
    if isinstance(refusal, str):
        raise ConfigError(f"Partial FC cannot shard {name}: {refusal}")
    if cls.margin_and_slope is CosineMarginHead.margin_and_slope or cls.logits is not CosineMarginHead.logits:
        raise ConfigError(
            f"Partial FC cannot shard {name}: its margin is not a transform of the target cosine "
            "alone (it changes other columns or needs the feature norms); use it without Partial FC"
        )


def check_head(head: nn.Module) -> None:
    check_head_class(type(head))
    name = type(head).__name__
    if isinstance(getattr(head, "partial_fc_refusal", None), str):  # set by the instance (AdaCos mode=dynamic)
        raise ConfigError(f"Partial FC cannot shard {name}: {head.partial_fc_refusal}")
    others = sorted(set(head.state_dict()) - {"weight"})
    if others:  # e.g. a learnable s: its gradient would be this rank's share only
        raise ConfigError(
            f"Partial FC shards only the class weights; {name} also holds {', '.join(others)} "
            "(a learnable scale?): use a fixed s with Partial FC"
        )


class PartialFC(nn.Module):
    """The global-batch margin softmax loss with this rank's shard of the classes: ``loss = pfc(emb, labels)``.

    ``head``: a ``CosineMarginHead`` built with ``num_classes = end - start`` of ``shard_range(num_classes,
    rank, world_size)``; its ``weight`` is this rank's shard and is what the optimizer updates.
    ``sample_rate``: the share of this rank's classes in each step's softmax; the positives of the global
    batch are always in it (when they alone exceed the share, only they are). 1.0 is plain model
    parallelism, numerically the unsharded head with ``F.cross_entropy``.
    ``init_seed``: when given, the shard's rows are re-drawn as rows of one all-classes weight drawn from a
    generator with this seed, so the starting weights do not depend on the number of ranks.
    ``backbone_grads_averaged``: set it when the backbone is wrapped in DistributedDataParallel, which
    averages the gradients of the ranks; the embeddings' gradient is then multiplied by the world size so
    the averaged gradient is the gradient of the (global-batch) loss (InsightFace does this always).
    Every rank must pass the same batch size each step (use ``drop_last``).
    """

    produces_loss = True  # its training output is the loss, a ``HeadLoss`` (heads/output.py): no cross-entropy on it

    def __init__(
        self,
        head: CosineMarginHead,
        num_classes: int,
        sample_rate: float = 1.0,
        *,
        group=None,
        backbone_grads_averaged: bool = False,
        seed: int = 0,
        init_seed: int | None = None,
    ):
        super().__init__()
        check_head(head)
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.num_classes = int(num_classes)
        self.class_start, self.class_end = shard_range(self.num_classes, self.rank, self.world_size)
        self.num_local = self.class_end - self.class_start
        if head.num_classes != self.num_local:
            raise ConfigError(
                f"rank {self.rank} owns classes [{self.class_start}, {self.class_end}) "
                f"({self.num_local}); its head was built with num_classes={head.num_classes}"
            )
        self.head = head
        self.sample_rate = check_float("sample_rate", sample_rate, low=0.0, high=1.0, low_inclusive=False)
        self.num_sample = max(1, int(self.sample_rate * self.num_local))
        self.grad_scale = float(self.world_size) if backbone_grads_averaged else 1.0
        self.sub_centers = head.weight.shape[0] // head.num_classes  # k rows per class (sub-center ArcFace)
        self.seed = int(seed)
        self.step = 0  # training forwards so far: the negatives of a step depend on (seed, rank, step) only
        self._generator: torch.Generator | None = None
        self.last_sampled: Tensor | None = None  # the local classes in the last softmax (None: all)
        if init_seed is not None:
            self.init_weight_(init_seed)

    @property
    def weight(self) -> nn.Parameter:
        return self.head.weight

    @torch.no_grad()
    def init_weight_(self, seed: int, chunk_rows: int = 65_536) -> None:
        """This rank's rows of an all-classes weight drawn with the head's own init (``head.weight_init``, as the
        unsharded head draws it) from a generator seeded with ``seed``; in row chunks, so no rank holds the whole
        matrix, and the rows do not depend on the number of ranks."""
        rows, dim = self.num_classes * self.sub_centers, self.weight.shape[1]
        first, last = self.class_start * self.sub_centers, self.class_end * self.sub_centers
        # CPU normal_ draws blocks of 16 values (a tail of fewer on its own): chunks of whole blocks, the last one
        # taking any short tail, continue the stream of one draw of all rows
        step = 16 // math.gcd(dim, 16)
        chunk_rows = max(step, chunk_rows // step * step)
        gen = torch.Generator().manual_seed(seed)
        lo = 0
        while lo < last:  # the rows before this shard are drawn and dropped
            size = rows - lo if (rows - lo - chunk_rows) * dim < 16 else chunk_rows
            chunk = fill_class_weight_(torch.empty(size, dim), self.head.weight_init, gen, total_rows=rows)
            keep = slice(max(first, lo), min(last, lo + size))
            if keep.start < keep.stop:
                self.weight[keep.start - first : keep.stop - first] = chunk[keep.start - lo : keep.stop - lo]
            lo += size

    @torch.no_grad()
    def sample(self, positives: Tensor) -> Tensor:
        """Sorted local class indices: every positive plus random negatives up to ``num_sample``."""
        if self.num_sample <= positives.numel():
            return positives
        device = self.weight.device
        if self._generator is None or self._generator.device != device:  # made on the weight's device
            self._generator = torch.Generator(device=device)
        # reseeded every step, so a resumed run draws the negatives the uninterrupted run would have drawn
        self._generator.manual_seed(((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.step) % 2**63)
        score = torch.rand(self.num_local, device=device, generator=self._generator)
        score[positives] = 2.0  # positives first
        return score.topk(self.num_sample).indices.sort().values

    def class_rows(self, classes: Tensor | None) -> Tensor:
        """The weight rows of the given local classes (all when None), k sub-centre rows per class."""
        if classes is None:
            return self.weight
        return self.weight.view(self.num_local, self.sub_centers, -1)[classes].flatten(0, 1)

    def cosines(self, embeddings: Tensor, classes: Tensor | None) -> Tensor:
        """B x n cosines to the given local classes (all when None); max over sub-centres when k > 1."""
        weight = self.class_rows(classes)
        # <x/|x|, w/|w|> as linear(x/|x|, w) / |w|: no normalised copy of the (large) weight shard and no
        # weight-sized buffers in its backward; equal to F.normalize's result up to rounding. The features are
        # normalised as the heads do (heads/kernels: a near-zero feature's gradient stays bounded)
        inv_norm = 1.0 / torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12)
        cos = at_least_float32(F.linear(normalize_features(embeddings), weight)) * at_least_float32(inv_norm)
        cos = cos.clamp(-1.0, 1.0)
        if self.sub_centers > 1:
            cos = cos.view(cos.shape[0], -1, self.sub_centers).amax(dim=2)
        return cos

    def forward(self, embeddings: Tensor, labels: Tensor | None = None, *, stats: bool = False) -> HeadLoss:
        """The global batch's loss, with neither predictions nor step statistics (``stats`` is not honoured): no
        rank scores every class."""
        if labels is None:
            raise ConfigError(
                "PartialFC computes the training loss; evaluate with the embeddings "
                "(verification) or the unsharded head"
            )
        self.head._check_inputs(embeddings, labels)
        all_embeddings = all_gather_with_grad(embeddings, self.group, self.grad_scale)
        all_labels = all_gather_no_grad(labels.to(torch.int64), self.group)
        local = all_labels - self.class_start
        owned = (local >= 0) & (local < self.num_local)
        classes = None
        if self.num_sample < self.num_local:
            classes = self.sample(torch.unique(local[owned]))
            local = torch.where(owned, torch.searchsorted(classes, local.clamp(0, self.num_local - 1)), local)
        self.last_sampled = classes
        self.step += 1
        rows = (self.num_local if classes is None else classes.numel()) * self.sub_centers  # the n this step scores
        if self.head.chunks(all_embeddings.shape[0], rows):  # the same loss in class blocks, never the B x n logits
            return self.head.chunked_loss(  # (a HeadLoss without predictions: ``reduce`` is given)
                all_embeddings,
                torch.where(owned, local, torch.full_like(local, -1)),
                self.class_rows(classes),
                self._row_reduce,
            )
        cos = self.cosines(all_embeddings, classes)
        logits = cos * self.head.s
        rows = owned.nonzero().squeeze(1)
        cols = local[rows]
        # the head's margin on the target cosines this rank owns; labels given as local class indices
        target = self.head.target_cosine(cos[rows, cols], all_labels[rows] - self.class_start)
        logits.index_put_((rows, cols), (self.head.s * target).to(logits.dtype))  # fresh tensor: autograd-safe
        return HeadLoss(dist_cross_entropy(logits, torch.where(owned, local, torch.full_like(local, -1)), self.group))

    def _row_reduce(self, tensor: Tensor, op: str) -> None:
        """All-reduces the chunked loss's row statistics in place (``max`` or ``sum``); one rank: nothing."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.group)

    def extra_loss(self) -> Tensor | None:
        return self.head.extra_loss()

    def schedule_values(self) -> dict[str, float]:
        return self.head.schedule_values()

    # ---- checkpoints in the unsharded layout -----------------------------------------------------------------
    def _row_counts(self) -> list[int]:
        return [
            (end - start) * self.sub_centers
            for start, end in (shard_range(self.num_classes, r, self.world_size) for r in range(self.world_size))
        ]

    @torch.no_grad()
    def gather_rows(self, shard: Tensor) -> Tensor | None:
        """Collective: every rank's rows of a weight-shaped tensor, in class order, on rank 0 (CPU); None elsewhere."""
        if self.world_size == 1:
            return shard.detach().cpu().clone()
        counts = self._row_counts()
        padded = shard.new_zeros((max(counts), *shard.shape[1:]))  # gather needs equal shapes
        padded[: shard.shape[0]] = shard
        parts = [torch.empty_like(padded) for _ in counts] if self.rank == 0 else None
        dist.gather(padded, parts, dst=0, group=self.group)
        if self.rank != 0:
            return None
        return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()

    def shard_rows(self, full: Tensor) -> Tensor:
        """This rank's rows of a weight-shaped tensor of all classes."""
        expected = self.num_classes * self.sub_centers
        if full.shape[0] != expected:
            raise ConfigError(
                f"a class weight of {full.shape[0]} rows cannot be sharded for {self.num_classes} "
                f"classes ({expected} rows): the checkpoint belongs to another data set"
            )
        return full[self.class_start * self.sub_centers : self.class_end * self.sub_centers]

    def full_state_dict(self) -> dict | None:
        """Collective: the unsharded head's state dict on rank 0, None on the other ranks."""
        weight = self.gather_rows(self.weight)
        return None if weight is None else {"weight": weight}

    def load_full_state_dict(self, state: dict) -> None:
        """Loads the unsharded head's state dict (any world size wrote it): this rank keeps its rows."""
        if "weight" not in state:
            raise RuntimeError("Error(s) in loading state_dict: missing key head.weight")
        self.head.load_state_dict({**state, "weight": self.shard_rows(state["weight"])})

    def extra_repr(self) -> str:
        return (
            f"classes [{self.class_start}, {self.class_end}) of {self.num_classes}, rank {self.rank}/"
            f"{self.world_size}, sample_rate={self.sample_rate:g}"
        )


def build_partial_fc(make_head, num_classes: int, sample_rate: float = 1.0, **kwargs) -> PartialFC:
    """``make_head(num_classes=n)`` -> a head for this rank's shard of ``num_classes``, wrapped in PartialFC.

    E.g. ``build_partial_fc(partial(ArcFaceHead, 512, s=64, m=0.5), 85_742, sample_rate=0.1)``; in the
    Hydra flow ``make_head = lambda num_classes: instantiate(cfg.head, in_features=dim, num_classes=num_classes)``.
    """
    start, end = shard_range(num_classes, *group_rank_and_size(kwargs.get("group")))
    return PartialFC(make_head(num_classes=end - start), num_classes, sample_rate, **kwargs)
