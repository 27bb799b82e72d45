"""Partial FC on 2 CPU processes (gloo): the sharded loss and gradients equal the unsharded head's."""

from __future__ import annotations

import math
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from marginlab.distributed import (
    PartialFC,
    all_gather_with_grad,
    build_partial_fc,
    dist_cross_entropy,
    shard_range,
    sharded_state,
)
from marginlab.errors import ConfigError
from marginlab.heads.amsoftmax import AMSoftmaxHead
from marginlab.heads.arcface import ArcFaceHead
from marginlab.heads.base import fill_class_weight_
from marginlab.heads.combined import CombinedMarginHead
from marginlab.heads.curricularface import CurricularFaceHead
from marginlab.heads.magface import MagFaceHead
from marginlab.heads.normface import NormFaceHead
from marginlab.heads.softmax import SoftmaxHead
from marginlab.heads.subcenter_arcface import SubCenterArcFaceHead

WORLD = 2
DIM = 8

HEADS = {
    "normface": partial(NormFaceHead, DIM, s=16.0),
    "amsoftmax": partial(AMSoftmaxHead, DIM, s=30.0, m=0.35),
    "arcface": partial(ArcFaceHead, DIM, s=64.0, m=0.5),
    "arcface_straight_through": partial(ArcFaceHead, DIM, s=64.0, m=0.5, mode="straight_through"),
    "combined": partial(CombinedMarginHead, DIM, s=64.0, m1=1.0, m2=0.3, m3=0.2),
    "subcenter_arcface": partial(SubCenterArcFaceHead, DIM, s=64.0, m=0.5, k=2),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(fn, *args):
    """Runs ``fn(rank, *args)`` on WORLD processes with a gloo group on 127.0.0.1; re-raises a worker's failure.

    Forked where the platform can (0.3 s): a spawned child re-imports torch, ~10 s on two busy cores.
    """
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(fn, free_port(), args), nprocs=WORLD, join=True, start_method=method)


def _worker(rank, fn, port, args):
    torch.set_num_threads(1)  # no intra-op thread pool in a forked child
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def assert_close(actual, expected, tol=1e-6, msg=""):
    """|actual - expected| <= tol (1 + |expected|) elementwise (torch.testing.assert_close would import
    torch.distributed.tensor and sympy in each worker once a process group exists: 3.5 s)."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = ((actual - expected).abs() / (1 + expected.abs())).max().item()
    assert err <= tol, f"{msg}: relative error {err:.3g} > {tol:g}"


def full_and_local_heads(make_head, num_classes, rank, dtype, world=WORLD):
    """The unsharded head and this rank's shard head with the same weights (rows of the full weight)."""
    torch.manual_seed(0)
    full = make_head(num_classes=num_classes).to(dtype)
    start, end = shard_range(num_classes, rank, world)
    local = make_head(num_classes=end - start).to(dtype)
    k = full.weight.shape[0] // num_classes
    with torch.no_grad():
        local.weight.copy_(full.weight[start * k : end * k])
    return full, local, (start, end, k)


def global_batch(batch_per_rank, num_classes, dtype, seed=1, label_pool=None):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(WORLD * batch_per_rank, DIM, generator=gen, dtype=dtype) * 3
    pool = torch.arange(num_classes) if label_pool is None else torch.tensor(label_pool)
    labels = pool[torch.randint(len(pool), (WORLD * batch_per_rank,), generator=gen)]
    return emb, labels


def check_equivalence(rank, dtype, tol):
    num_classes, bpr = 11, 6  # shards of 6 and 5 classes
    for name, make_head in HEADS.items():
        full, local, (start, end, k) = full_and_local_heads(make_head, num_classes, rank, dtype)
        emb, labels = global_batch(bpr, num_classes, dtype)
        # reference: the unsharded head + F.cross_entropy on the global batch
        ref_emb = emb.clone().requires_grad_(True)
        ref_loss = F.cross_entropy(full(ref_emb, labels), labels)
        ref_loss.backward()
        # sharded: this rank's embeddings and its weight shard
        my = slice(rank * bpr, (rank + 1) * bpr)
        my_emb = emb[my].clone().requires_grad_(True)
        pfc = PartialFC(local, num_classes, sample_rate=1.0)
        loss = pfc(my_emb, labels[my]).loss
        loss.backward()
        assert loss.dtype == dtype, name
        assert_close(loss, ref_loss.detach(), tol, f"{name}: loss")
        assert_close(my_emb.grad, ref_emb.grad[my], tol, f"{name}: grad emb")
        assert_close(local.weight.grad, full.weight.grad[start * k : end * k], tol, f"{name}: grad weight shard")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_sample_rate_one_equals_the_unsharded_head(dtype, tol):
    spawn(check_equivalence, dtype, tol)


def check_sampling(rank):
    num_classes, bpr, dtype = 40, 4, torch.float64
    full, local, (start, end, _) = full_and_local_heads(HEADS["arcface"], num_classes, rank, dtype)
    # 4 distinct labels per shard at most, fewer than the 5 sampled classes per rank (0.25 * 20)
    emb, labels = global_batch(bpr, num_classes, dtype, label_pool=[1, 7, 12, 19, 22, 30, 33])
    my = slice(rank * bpr, (rank + 1) * bpr)
    my_emb = emb[my].clone().requires_grad_(True)
    pfc = PartialFC(local, num_classes, sample_rate=0.25, seed=3)
    loss = pfc(my_emb, labels[my]).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(my_emb.grad).all()
    sampled = pfc.last_sampled
    assert sampled.numel() == 5 and torch.equal(sampled, sampled.sort().values)
    owned = labels[(labels >= start) & (labels < end)] - start
    assert torch.isin(owned, sampled).all()  # every positive is in the softmax
    grad_rows = local.weight.grad.abs().sum(1) > 0
    assert torch.equal(grad_rows.nonzero().squeeze(1), sampled)  # only sampled rows receive gradient
    # the loss and gradients are those of the unsharded head restricted to the sampled classes of both ranks
    parts = [None] * WORLD
    dist.all_gather_object(parts, (sampled + start).tolist())
    classes = torch.tensor(sorted(c for part in parts for c in part))
    ref_emb = emb.clone().requires_grad_(True)
    logits = full(ref_emb, labels)[:, classes]
    ref_loss = F.cross_entropy(logits, torch.searchsorted(classes, labels))
    ref_loss.backward()
    assert_close(loss, ref_loss.detach(), 1e-5)
    assert_close(my_emb.grad, ref_emb.grad[my], 1e-5)
    assert_close(local.weight.grad, full.weight.grad[start:end], 1e-5)
    # with DDP averaging the backbone's gradients, the embeddings' gradient is scaled by the world size
    my_emb.grad = None
    PartialFC(local, num_classes, sample_rate=1.0, backbone_grads_averaged=True)(my_emb, labels[my]).loss.backward()
    my_emb2 = emb[my].clone().requires_grad_(True)
    PartialFC(local, num_classes, sample_rate=1.0)(my_emb2, labels[my]).loss.backward()
    assert_close(my_emb.grad, WORLD * my_emb2.grad)


def check_memory_and_helpers(rank):
    num_classes, dim = 1000, 64
    pfc = build_partial_fc(partial(AMSoftmaxHead, dim), num_classes, sample_rate=0.1)
    full_bytes = num_classes * dim * 4
    assert pfc.weight.nbytes == full_bytes // WORLD  # the weight per rank falls as 1/N
    assert (pfc.class_start, pfc.class_end) == ((0, 500) if rank == 0 else (500, 1000))
    assert pfc.num_sample == 50
    # the collectives alone: gather with gradient, distributed cross-entropy
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    assert gathered[:, 0].tolist() == [1, 1, 2, 2]
    (gathered.sum(1) * torch.arange(1.0, 5.0)).sum().backward()
    assert x.grad[:, 0].tolist() == ([2, 4] if rank == 0 else [6, 8])  # summed over the 2 ranks
    logits = torch.tensor([[1.0, 2.0], [0.5, -1.0]]) + rank  # columns 2r, 2r+1 of a 2 x 4 matrix
    target = torch.tensor([1, -1]) if rank == 0 else torch.tensor([-1, 0])
    full_logits = torch.cat([torch.tensor([[1.0, 2.0], [0.5, -1.0]]) + r for r in range(WORLD)], dim=1)
    expected = F.cross_entropy(full_logits, torch.tensor([1, 2]))
    assert_close(dist_cross_entropy(logits, target), expected)
    for head in (CurricularFaceHead(dim, 500), MagFaceHead(dim, 500), SoftmaxHead(dim, 500)):
        with pytest.raises(ConfigError, match="Partial FC"):
            PartialFC(head, num_classes)
    with pytest.raises(ConfigError, match="num_classes=400"):
        PartialFC(AMSoftmaxHead(dim, 400), num_classes)


def test_sampled_negatives_only_sampled_rows_get_gradient():
    spawn(check_sampling)


def test_weight_shard_halves_and_collectives():
    spawn(check_memory_and_helpers)


def test_shard_range_covers_every_class_once():
    for world in (1, 2, 3, 8):
        ranges = [shard_range(85_742, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 85_742
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    with pytest.raises(ConfigError, match="at least one class"):
        shard_range(1, 0, 2)


def test_one_process_without_a_process_group_is_the_unsharded_head():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    full, local, _ = full_and_local_heads(HEADS["arcface"], 7, rank=0, dtype=torch.float64, world=1)
    assert local.weight.shape == full.weight.shape  # one rank owns every class
    emb, labels = global_batch(4, 7, torch.float64)
    ref_emb, my_emb = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    ref_loss = F.cross_entropy(full(ref_emb, labels), labels)
    ref_loss.backward()
    loss = PartialFC(local, 7)(my_emb, labels).loss
    loss.backward()
    assert_close(loss.detach(), ref_loss.detach(), 1e-10)
    assert_close(my_emb.grad, ref_emb.grad, 1e-10)
    assert_close(local.weight.grad, full.weight.grad, 1e-10)


def test_negatives_are_a_function_of_seed_rank_and_step():
    """A resumed run (``step`` restored from the checkpoint) draws the negatives the straight run drew."""
    pfc = PartialFC(AMSoftmaxHead(4, 100), 100, sample_rate=0.1, seed=5)
    positives = torch.tensor([3, 50])
    draws = []
    for _ in range(3):
        draws.append(pfc.sample(positives))
        pfc.step += 1
    assert not torch.equal(draws[0], draws[1])  # a new share of negatives every step
    again = PartialFC(AMSoftmaxHead(4, 100), 100, sample_rate=0.1, seed=5)
    again.step = 2
    assert torch.equal(again.sample(positives), draws[2])
    assert all(torch.isin(positives, d).all() and d.numel() == 10 for d in draws)


def check_state_and_init(rank):
    """Checkpoint state in the unsharded layout: gathered on rank 0, sliced back on load; world-independent init."""
    num_classes, dim, k = 11, 5, 2
    make = partial(SubCenterArcFaceHead, dim, s=16.0, m=0.2, k=k)
    pfc = build_partial_fc(make, num_classes, init_seed=7)
    pfc.init_weight_(7, chunk_rows=3)  # chunked drawing gives the same rows as one draw
    # the head's official init (sub-center ArcFace: N(0, 0.01^2)), as one all-classes draw: rank independent
    expected = fill_class_weight_(torch.empty(num_classes * k, dim), "normal_0.01", torch.Generator().manual_seed(7))
    assert_close(pfc.weight.detach(), expected[pfc.class_start * k : pfc.class_end * k], 0.0)
    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.Linear(3, dim), pfc
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(rank)
    pfc(
        model.backbone(torch.randn(6, 3, generator=gen)), torch.randint(num_classes, (6,), generator=gen)
    ).loss.backward()
    opt.step()
    model_state = sharded_state.model_state_dict(model)
    optim_state = sharded_state.optimizer_state_dict(opt, model)
    shards = [None] * WORLD
    dist.all_gather_object(shards, (pfc.weight.detach().clone(), opt.state[pfc.weight]["momentum_buffer"].clone()))
    if rank == 0:
        assert sorted(model_state) == ["backbone.bias", "backbone.weight", "head.weight"]
        assert_close(model_state["head.weight"], torch.cat([w for w, _ in shards]), 0.0)
        assert_close(optim_state["state"][2]["momentum_buffer"], torch.cat([m for _, m in shards]), 0.0)
    else:
        assert model_state is None and optim_state is None
    box = [(model_state, optim_state)]
    dist.broadcast_object_list(box, src=0)
    # a fresh model of this world size loads the unsharded state: each rank gets its own rows back
    fresh = torch.nn.Module()
    fresh.backbone, fresh.head = torch.nn.Linear(3, dim), build_partial_fc(make, num_classes)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    sharded_state.load_model_state_dict(fresh, box[0][0])
    sharded_state.load_optimizer_state_dict(fresh_opt, fresh, box[0][1])
    assert_close(fresh.head.weight.detach(), pfc.weight.detach(), 0.0)
    assert_close(fresh_opt.state[fresh.head.weight]["momentum_buffer"], opt.state[pfc.weight]["momentum_buffer"], 0.0)
    with pytest.raises(ConfigError, match="another data set"):
        fresh.head.load_full_state_dict({"weight": torch.zeros(4, dim)})


def test_checkpoint_state_is_unsharded_and_init_independent_of_world_size():
    spawn(check_state_and_init)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_init_seed_draws_the_heads_own_init(name):
    """The seeded init is the head's official one (unit rows for NormFace, N(0, 0.01^2) for ArcFace ...), drawn as
    the unsharded head draws it from the same generator, in any chunking; init=kaiming is honoured too."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    num_classes = 21
    for init in ("official", "kaiming"):
        head = HEADS[name](num_classes=num_classes, init=init)
        unsharded = HEADS[name](num_classes=num_classes, init=init)
        unsharded.reset_weight(torch.Generator().manual_seed(3))
        pfc = PartialFC(head, num_classes, init_seed=3)
        assert_close(pfc.weight.detach(), unsharded.weight.detach(), 0.0, f"{name} {init}")
        pfc.weight.data.zero_()
        pfc.init_weight_(3, chunk_rows=5)
        assert_close(pfc.weight.detach(), unsharded.weight.detach(), 0.0, f"{name} {init} chunked")
    norms = PartialFC(HEADS["normface"](num_classes=num_classes), num_classes, init_seed=3).weight.norm(dim=1)
    assert torch.allclose(norms, torch.ones(num_classes))  # NormFace's unit rows, not U(+-1/sqrt(D))


def test_unsharded_state_loads_into_one_process():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    model = torch.nn.Module()
    model.backbone, model.head = torch.nn.Linear(3, 4), PartialFC(AMSoftmaxHead(4, 6), 6)
    state = {"backbone.weight": torch.ones(4, 3), "backbone.bias": torch.zeros(4), "head.weight": torch.eye(6, 4)}
    sharded_state.load_model_state_dict(model, state)
    assert torch.equal(model.head.weight.detach(), torch.eye(6, 4))
    assert sharded_state.model_state_dict(model).keys() == state.keys()
    with pytest.raises(RuntimeError, match="unexpected keys"):
        sharded_state.load_model_state_dict(model, {**state, "extra": torch.zeros(1)})


def test_a_near_zero_feature_gets_a_bounded_gradient():
    """Issue #13: Partial FC normalises features as the heads do, so a feature of norm 1e-11 cannot blow up a step
    (F.normalize's eps of 1e-12 passed back ~1e11 times the gradient); a zero feature gets none."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dim, num_classes = 8, 12
    torch.manual_seed(0)
    for norm in (0.0, 1e-11, 1e-6):
        pfc = PartialFC(ArcFaceHead(dim, num_classes), num_classes, sample_rate=1.0, init_seed=0)
        x = torch.randn(4, dim, dtype=torch.float64)
        x[0] = x[0] / x[0].norm() * norm
        x.requires_grad_(True)
        pfc.double()(x, torch.tensor([0, 1, 2, 3])).loss.backward()
        grad = x.grad[0].norm().item()
        assert math.isfinite(grad) and grad < 1e4 * pfc.head.s, (norm, grad)
        assert (grad == 0.0) == (norm == 0.0), (norm, grad)
