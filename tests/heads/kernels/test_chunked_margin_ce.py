"""The chunked margin cross-entropy (heads/kernels/chunked_margin_ce.py): the unfused head's loss and gradients
in float64 for every cosine-margin head, any block size, with and without Partial FC; no B x C tensor saved."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from marginlab.distributed.partial_fc import PartialFC
from marginlab.errors import ConfigError
from marginlab.geometry.stats import target_and_nearest_other
from marginlab.heads.adaface import AdaFaceHead
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.combined import CombinedMarginHead
from marginlab.heads.curricularface import CurricularFaceHead
from marginlab.heads.kernels import chunked_margin_cross_entropy
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.normface import NormFaceHead
from marginlab.heads.output import HeadLoss
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead
from marginlab.losses import MarginLoss, criterion_for
from marginlab.regularizers.center import CenterLoss
from marginlab.regularizers.incay import FeatureIncay

DIM, CLASSES = 6, 11

#: every head whose margin is ``margin_and_slope`` of the target cosine (configs/head: normface, cosine and
#: coco are NormFace at their s; cosface is AM-Softmax at s 64)
HEADS = {
    "normface": partial(NormFaceHead, s=16.0),
    "cosine": partial(NormFaceHead, s=1.0),
    "coco": partial(NormFaceHead, s=21.475),
    "amsoftmax": partial(AMSoftmaxHead, s=30.0, m=0.35),
    "cosface": partial(AMSoftmaxHead, s=64.0, m=0.35),
    "arcface": partial(ArcFaceHead, s=64.0, m=0.5),
    "arcface_easy_margin": partial(ArcFaceHead, s=64.0, m=0.5, easy_margin=True),
    "arcface_straight_through": partial(ArcFaceHead, s=64.0, m=0.5, mode="straight_through"),
    "arcface_no_fallback": partial(ArcFaceHead, s=64.0, m=0.5, mode="no_fallback"),
    "combined": partial(CombinedMarginHead, s=64.0, m1=1.0, m2=0.3, m3=0.2),
    "combined_sphere": partial(CombinedMarginHead, s=30.0, m1=2.0, m2=0.0, m3=0.0),
    "combined_cosine_only": partial(CombinedMarginHead, s=64.0, m1=1.0, m2=0.0, m3=0.35),
    "subcenter_arcface": partial(SubCenterArcFaceHead, s=64.0, m=0.5, k=3),
    "subcenter_arcface_exact": partial(SubCenterArcFaceHead, s=64.0, m=0.5, k=2, mode="exact"),
}
#: 1 class per block, one not dividing C, and blocks of C and more (one block)
BLOCKS = (1, 4, CLASSES, 64)


def batch(head, size=9, seed=0):
    """float64 features and labels in every block; rows 0-2 collinear with, opposite to and zero for their class."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(size, DIM, generator=gen, dtype=torch.float64) * 3
    labels = torch.tensor([0, 3, 10, 5, 5, 7, 9, 1, 4])[:size]
    w = head.weight.detach()
    x[0], x[1], x[2] = 2.5 * w[labels[0]], -1.7 * w[labels[1]], 0.0
    return x, labels


def reference(head, x, labels):
    """The unfused head + F.cross_entropy: loss, d loss / dx, d loss / dW."""
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(head(x, labels), labels)
    return (loss.detach(), *torch.autograd.grad(loss, [x, head.weight]))


def chunked(head, x, labels, block, weight=None):
    x = x.clone().requires_grad_(True)
    weight = head.weight if weight is None else weight
    loss = chunked_margin_cross_entropy(
        x, weight, labels, head.s, head.margin_and_slope, head.precise_target, block, sub_centers=head.sub_centers
    )
    return (loss.detach(), *torch.autograd.grad(loss, [x, head.weight]))


def assert_close(actual, expected, msg):
    for name, a, e in zip(("loss", "dx", "dW"), actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=f"{msg} {name}")


@pytest.mark.parametrize("name", sorted(HEADS))
def test_values_and_gradients_equal_the_unfused_head_for_every_block_size(name):
    torch.manual_seed(0)
    head = HEADS[name](DIM, CLASSES).double()
    x, labels = batch(head)
    expected = reference(head, x, labels)
    for block in BLOCKS:
        assert_close(chunked(head, x, labels, block), expected, f"{name} block={block}")


def test_under_bfloat16_autocast_the_matmuls_run_in_bfloat16_and_the_rest_in_float32():
    torch.manual_seed(0)
    head = ArcFaceHead(DIM, CLASSES)
    x, labels = batch(head.double())
    head.float()
    x = x.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(head(x, labels).float(), labels)
        loss = chunked_margin_cross_entropy(x, head.weight, labels, head.s, head.margin_and_slope, True, 4)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)  # both in bfloat16's matmul precision
    loss.backward()
    assert x.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["arcface", "subcenter_arcface", "curricularface", "adaface"])
def test_a_training_forward_returns_the_loss_and_on_probe_steps_the_target_and_nearest_other_cosines(name):
    torch.manual_seed(0)
    make = {**HEADS, **OWN_MARGIN_HEADS}[name]
    plain = make(DIM, CLASSES).double()
    head = copy.deepcopy(plain)
    head.chunked, head.chunk_size = True, 4
    x, labels = batch(head)
    expected = F.cross_entropy(plain(x, labels), labels)
    want_target, want_other = target_and_nearest_other(plain.cosine(x), labels)
    out = copy.deepcopy(head)(x, labels)  # a step that logs no geometry: no statistics
    assert isinstance(out, HeadLoss) and out.loss.dim() == 0 and out.stats is None
    out = head(x, labels, stats=True)  # a step that logs geometry: still the loss, never the B x C cosines
    assert isinstance(out, HeadLoss) and out.loss.dim() == 0
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=0)
    target, other = out.stats
    assert not target.requires_grad and not other.requires_grad
    torch.testing.assert_close(target, want_target, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(other, want_other, rtol=1e-12, atol=1e-12)
    head.eval()
    assert head(x, labels).shape == (9, CLASSES) and head(x).shape == (9, CLASSES)


def test_margin_loss_takes_the_chunked_path_and_predicts_from_the_blocks():
    torch.manual_seed(0)
    plain = CombinedMarginHead(DIM, CLASSES).double()
    head = CombinedMarginHead(DIM, CLASSES, chunked=True).double()
    head.load_state_dict(plain.state_dict())
    centre = CenterLoss(DIM, CLASSES).double()
    x, labels = batch(head)
    criterion = MarginLoss(head, [centre])
    assert criterion.classifies and MarginLoss(plain).classifies
    expected = MarginLoss(plain, [copy.deepcopy(centre)])(x, labels)  # (the centres move each call)
    loss = criterion(x, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)  # (MarginLoss takes the cross-entropy in float32)
    # the trainer's path: the head's HeadLoss is the cross-entropy already, with the blocks' predictions
    plain_loss = F.cross_entropy(plain(x, labels), labels)
    step = MarginLoss(head).step(x, head(x, labels), labels)
    torch.testing.assert_close(step.loss, plain_loss.float(), rtol=1e-6, atol=0)
    assert torch.equal(step.predicted, plain(x, labels).argmax(1)) and step.stats is None  # the trainer's accuracy


def test_no_saved_tensor_has_a_column_per_class():
    """The forward keeps B-element row statistics, x, W and its C norms, never anything B x C."""
    torch.manual_seed(0)
    classes, rows = 1000, 16
    head = ArcFaceHead(DIM, classes)
    x = torch.randn(rows, DIM, requires_grad=True)
    labels = torch.randint(0, classes, (rows,))

    def saved_shapes(fn):
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()
        return shapes

    def has_class_columns(shapes):  # a matrix with a column per class (the C weight norms are a vector)
        return any(len(shape) == 2 and shape[-1] == classes for shape in shapes)

    assert has_class_columns(saved_shapes(lambda: F.cross_entropy(head(x, labels), labels)))  # the old path does
    shapes = saved_shapes(
        lambda: chunked_margin_cross_entropy(x, head.weight, labels, head.s, head.margin_and_slope, True, 64)
    )
    assert not has_class_columns(shapes), shapes
    assert max(torch.Size(s).numel() for s in shapes) == classes * DIM  # the largest is W itself


@pytest.mark.parametrize("k", [1, 2], ids=["arcface", "subcenter k=2"])
@pytest.mark.parametrize("sample_rate", [1.0, 0.5], ids=["all classes", "sampled"])
def test_partial_fc_with_a_chunked_head_equals_partial_fc_without(sample_rate, k):
    torch.manual_seed(0)
    make = ArcFaceHead if k == 1 else partial(SubCenterArcFaceHead, k=k)
    plain = make(DIM, CLASSES).double()
    head = make(DIM, CLASSES, chunked=True, chunk_size=3).double()
    head.load_state_dict(plain.state_dict())
    x, labels = batch(head)
    x[2] = 1.0  # Partial FC's own cosines use F.normalize, whose gradient at a zero feature is ~1e12 (the heads': 0)
    grads = []
    for h in (plain, head):
        pfc = PartialFC(h, CLASSES, sample_rate=sample_rate, seed=5)
        emb = x.clone().requires_grad_(True)
        loss = criterion_for(_Model(pfc))(emb, labels)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [emb, h.weight])))
        if sample_rate < 1:
            assert pfc.last_sampled.numel() < CLASSES
    assert_close(grads[1], grads[0], f"partial fc sample_rate={sample_rate}")


class _Model(torch.nn.Module):
    """What ``criterion_for`` reads: a model with a ``head`` and ``regularizers``."""

    def __init__(self, head):
        super().__init__()
        self.head, self.regularizers = head, None


#: heads whose chunked margin is their own (``chunked_margin``): a running state, the feature norms (MagFace's
#: with its gradient) or a transform of the other columns; easy margins and fallbacks both ways
OWN_MARGIN_HEADS = {
    "curricularface": partial(CurricularFaceHead, s=64.0, m=0.5),
    "adaface": partial(AdaFaceHead, s=64.0, m=0.4, h=0.333),
    "adaface_steep": partial(AdaFaceHead, s=32.0, m=1.2, h=2.0),  # the angle clamp at both ends
    "magface": partial(MagFaceHead, l_a=1.0, u_a=9.0),  # norms on both sides of [l_a, u_a]
    "magface_fallback": partial(MagFaceHead, l_a=1.0, u_a=9.0, easy_margin=False),
}


def near(w, angle, norm):
    """A feature of this norm at this angle (rad) from w."""
    w = w.detach() / w.detach().norm()
    other = torch.ones_like(w)
    other = other - (other @ w) * w
    return norm * (w * torch.cos(torch.tensor(angle)) + other / other.norm() * torch.sin(torch.tensor(angle)))


def total_loss_and_grads(head, x, labels, chunked):
    """CE (the head's chunked loss, or the unfused head + F.cross_entropy) plus the head's own term (MagFace's g),
    and its gradients in x and W."""
    x = x.clone().requires_grad_(True)
    loss = head.chunked_loss(x, labels).loss if chunked else F.cross_entropy(head(x, labels), labels)
    extra = head.extra_loss()
    total = loss if extra is None else loss + extra
    return (total.detach(), *torch.autograd.grad(total, [x, head.weight]))


@pytest.mark.parametrize("name", sorted(OWN_MARGIN_HEADS))
def test_heads_with_their_own_margin_equal_the_unfused_head_with_the_same_running_state(name):
    torch.manual_seed(0)
    head = OWN_MARGIN_HEADS[name](DIM, CLASSES).double()
    x, labels = batch(head)
    x[3:] *= torch.linspace(0.1, 4.0, 6, dtype=torch.float64).unsqueeze(1)  # norms from 0.5 to 25
    # AdaFace's clamps where their gradient mask matters (cos = +-1 itself is a stationary point): row 3 at 0.02 rad
    # from class 7 (not its own: cos theta_j > 1 - 1e-3), row 4 at 0.1 rad from its class with a norm of 40 (the
    # steep head's theta_y + g_angle < eps)
    x[3], x[4] = near(head.weight[7], 0.02, 2.0), near(head.weight[labels[4]], 0.1, 40.0)
    for block in BLOCKS:
        plain, chunk = copy.deepcopy(head), copy.deepcopy(head)
        chunk.chunk_size = block
        for step in range(2):  # the second step starts from the running statistics the first one updated
            expected = total_loss_and_grads(plain, x, labels, chunked=False)
            assert_close(total_loss_and_grads(chunk, x, labels, chunked=True), expected, f"{name} block={block}")
            for key, value in plain.state_dict().items():
                torch.testing.assert_close(chunk.state_dict()[key], value, rtol=1e-12, atol=0, msg=key)
        if name.startswith("curricularface"):  # t has moved off 0, the hard negatives are re-weighted
            assert chunk.t.item() != 0.0


def test_a_training_forward_of_a_chunked_curricularface_returns_its_loss_and_updates_t():
    torch.manual_seed(0)
    head = CurricularFaceHead(DIM, CLASSES, chunked=True, chunk_size=4).double()
    plain = copy.deepcopy(head)
    plain.chunked = False
    x, labels = batch(head)
    out = head(x, labels)
    assert isinstance(out, HeadLoss)
    torch.testing.assert_close(out.loss, F.cross_entropy(plain(x, labels), labels), rtol=1e-10, atol=0)
    torch.testing.assert_close(head.t, plain.t, rtol=1e-12, atol=0)


def test_sub_centres_take_each_class_s_best_row_in_the_blocks_and_the_gradient_goes_to_it():
    torch.manual_seed(0)
    head = SubCenterArcFaceHead(DIM, CLASSES, k=3).double()
    x, labels = batch(head, size=4)  # 3 features with a direction: some rows are nobody's best
    x[3] = head.weight.detach()[7 * 3 + 2] * 2.0  # collinear with the last sub-centre of another class
    loss, _, grad_w = chunked(head, x, labels, 4)
    expected = reference(head, x, labels)
    assert_close((loss, _, grad_w), expected, "subcenter")
    # only the rows some feature picked as its class's best sub-centre (zero features pick none) get a gradient
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight.detach(), dim=1).t()
    best = cos.view(len(x), CLASSES, 3).argmax(dim=2) + torch.arange(CLASSES) * 3  # B x C: each class's best row
    picked = torch.zeros(CLASSES * 3, dtype=torch.bool)
    picked[best[x.norm(dim=1) > 0].flatten()] = True
    assert torch.equal(grad_w.abs().sum(dim=1) > 0, picked) and not picked.all()


def test_a_learnt_scale_gets_the_unfused_head_s_gradient():
    torch.manual_seed(0)
    plain = NormFaceHead(DIM, CLASSES, s=10.0, learnable_scale=True).double()
    head = NormFaceHead(DIM, CLASSES, s=10.0, learnable_scale=True, chunked=True, chunk_size=4).double()
    head.load_state_dict(plain.state_dict())
    x, labels = batch(head)
    grads = []
    for h in (plain, head):
        emb = x.clone().requires_grad_(True)
        out = h(emb, labels)
        loss = out.loss if isinstance(out, HeadLoss) else F.cross_entropy(out, labels)
        grads.append((loss.detach(), *torch.autograd.grad(loss, [emb, h.weight, h.s])))
    assert grads[1][3].abs() > 1e-3  # s moves
    for name, a, e in zip(("loss", "dx", "dW", "ds"), grads[1], grads[0]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11, msg=name)


def test_other_normalized_cosine_overrides_still_refuse_chunked():
    class Halved(ArcFaceHead):
        def normalized_cosine(self, embeddings):
            return super().normalized_cosine(embeddings) / 2

    with pytest.raises(ConfigError, match="chunked=true is not allowed with Halved"):
        Halved(DIM, CLASSES, chunked=True)


def test_bad_chunked_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="regularizer 'FeatureIncay' needs the logits"):
        MarginLoss(ArcFaceHead(DIM, CLASSES, chunked=True), [FeatureIncay(DIM, CLASSES)])
    with pytest.raises(ConfigError, match="chunk_size"):
        ArcFaceHead(DIM, CLASSES, chunked=True, chunk_size=0)


def _two_rank_check(rank, port):
    """Rank ``rank`` of 2: Partial FC with a chunked head equals the unsharded head + F.cross_entropy."""
    import torch.distributed as dist

    from marginlab.distributed.partial_fc import shard_range

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        full = CombinedMarginHead(DIM, CLASSES).double()
        start, end = shard_range(CLASSES, rank, 2)
        local = CombinedMarginHead(DIM, end - start, chunked=True, chunk_size=2).double()
        with torch.no_grad():
            local.weight.copy_(full.weight[start:end])
        x, labels = batch(full)
        x[2] = 1.0  # (Partial FC's F.normalize at a zero feature, see above)
        mine = slice(rank * 4, rank * 4 + 4)  # 4 of the 8 rows per rank
        emb = x[:8][mine].clone().requires_grad_(True)
        ref_x8 = x[:8].clone().requires_grad_(True)
        ref = F.cross_entropy(full(ref_x8, labels[:8]), labels[:8])
        ref.backward()
        loss = PartialFC(local, CLASSES)(emb, labels[:8][mine]).loss
        loss.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
        torch.testing.assert_close(emb.grad, ref_x8.grad[mine], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(local.weight.grad, full.weight.grad[start:end], rtol=1e-9, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_partial_fc_over_two_ranks_all_reduces_the_row_statistics():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_two_rank_check, args=(port,), nprocs=2, join=True, start_method=method)


@pytest.mark.parametrize("name", sorted(HEADS) + sorted(OWN_MARGIN_HEADS))
def test_each_rows_predicted_class_is_the_argmax_of_the_unfused_training_logits(name):
    """The training accuracy of a chunked step: one max per block, the first column on ties as torch.argmax
    (row 2 is a zero feature: every non-target logit 0)."""
    torch.manual_seed(0)
    plain = {**HEADS, **OWN_MARGIN_HEADS}[name](DIM, CLASSES).double()
    x, labels = batch(plain)
    x[3:] = x[3:] * 20  # (MagFace: norms on both sides of [l_a, u_a])
    want = plain(x, labels).argmax(1)
    assert len(set(want.tolist())) > 2  # not one class for every row
    for block in BLOCKS:
        head = copy.deepcopy(plain)
        head.chunked, head.chunk_size = True, block
        out = head(x, labels)
        assert isinstance(out, HeadLoss) and out.loss.dim() == 0
        assert torch.equal(out.predicted, want), f"{name} block={block}"


def test_partial_fc_chunked_steps_predict_nothing():
    """Under Partial FC no rank holds every class: the blocks give no prediction (and the criterion no accuracy)."""
    torch.manual_seed(0)
    head = ArcFaceHead(DIM, CLASSES, chunked=True, chunk_size=3).double()
    pfc = PartialFC(head, CLASSES, sample_rate=1.0)
    x, labels = batch(head)
    criterion = criterion_for(_Model(pfc))
    out = pfc(x, labels, stats=True)
    assert isinstance(out, HeadLoss) and out.predicted is None and out.stats is None
    step = criterion.step(x, out, labels, stats=True)
    assert step.loss.dim() == 0 and step.predicted is None and step.stats is None and not criterion.classifies
