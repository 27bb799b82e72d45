"""Shared checks for the head tests, handed to tests as the ``hh`` fixture (head helpers).

Every head test file uses the same few checks: a batch with the awkward rows (a feature collinear with
its class weight, one opposite to it, a zero feature), the bfloat16-autocast check, float64 gradcheck,
the probe cosines and the config file.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import marginlab
from marginlab.config.validate import resolve_head
from marginlab.training.builders import build_head

HEAD_CONFIGS = Path(marginlab.__file__).parent / "configs" / "head"


def make_batch(head, batch: int = 12, seed: int = 0, special: bool = True, scale: float = 3.0):
    """Embeddings (float32) and labels for ``head``; with ``special`` rows 0-2 are collinear with,
    opposite to, and orthogonal-by-zero to (a zero vector) their class weight."""
    # a stream of its own: with the global seed also 0, a head drawn N(0, sigma) (init=official) would
    # otherwise get rows exactly parallel to these features (cos theta_y = 1 everywhere)
    g = torch.Generator().manual_seed(10_007 + seed)
    x = torch.randn(batch, head.in_features, generator=g) * scale
    labels = torch.randint(0, head.num_classes, (batch,), generator=g)
    if special:
        w = head.weight.detach()[: head.num_classes].float()
        x[0] = 2.5 * w[labels[0]]  # cos theta_y = +1
        x[1] = -1.7 * w[labels[1]]  # cos theta_y = -1
        x[2] = 0.0  # zero-norm feature
    return x, labels


def feature_at_angle(weight_row, theta: float, norm: float = 2.0, seed: int = 0):
    """A feature of norm ``norm`` at angle ``theta`` (radians) from ``weight_row`` (float32)."""
    w = weight_row.detach().double()
    w_hat = w / w.norm()
    u = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u - (u @ w_hat) * w_hat
    u = u / u.norm()
    theta = torch.tensor(theta, dtype=torch.float64)
    return (norm * (torch.cos(theta) * w_hat + torch.sin(theta) * u)).float()


def reference_cosine(x, weight):
    """float64 cosines, B x C, computed with an explicit loop over the batch (not the heads' code)."""
    x, weight = x.double(), weight.double()
    rows = []
    for xi in x:
        nx = xi.norm()
        rows.append(torch.stack([(xi @ wj) / (nx * wj.norm()) if nx > 0 else xi.new_zeros(()) for wj in weight]))
    return torch.stack(rows).clamp(-1.0, 1.0)


def check_bf16(head, x, labels, input_dtype=torch.float32, expect_float32: bool = True):
    """Under CPU bfloat16 autocast: float32, finite training logits; finite gradients everywhere."""
    head.train()
    head.zero_grad(set_to_none=True)
    x = x.to(input_dtype).detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x, labels)
        loss = F.cross_entropy(logits, labels)
    if expect_float32:
        assert logits.dtype == torch.float32, f"{type(head).__name__} returned {logits.dtype} logits"
    assert torch.isfinite(logits).all()
    loss.backward()
    assert torch.isfinite(loss)
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
    for name, p in head.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eval_logits = head.eval()(x.detach())
    assert torch.isfinite(eval_logits).all()
    head.train()
    return logits


def check_loss_bf16(head, x, labels):
    """A head that is a loss of its own (HeadLoss) under CPU bfloat16 autocast: a float32, finite loss and finite
    gradients to the features and every parameter."""
    head.train()
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, labels)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


def train_and_resume(run_train, second_dir: Path, monkeypatch, *overrides: str) -> tuple[dict, dict, Path]:
    """``marginlab train`` for 2 epochs straight, then again stopped after epoch 1 (into ``second_dir``) and
    resumed: (the straight run's last weights, the resumed run's, the resumed run's directory)."""
    code, straight = run_train(*overrides, "trainer.epochs=2")
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(second_dir))
    assert run_train(*overrides, "trainer.epochs=2", "trainer.stop_after_epoch=1")[0] == 0
    assert run_train("resume=latest")[0] == 0
    split = next((second_dir / "runs").iterdir())
    weights = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in (straight, split)]
    return weights[0], weights[1], split


def gradcheck_head(head, x, labels, with_labels: bool = True):
    """float64 gradcheck of the head's logits w.r.t. the embeddings and every parameter.

    The head is put in eval mode so buffers that advance in training (annealing counters) stay put;
    labels are still given, so the margin is applied.
    """
    head = head.double().eval()
    names = [n for n, _ in head.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in head.named_parameters()]
    x = x.double().detach().requires_grad_(True)

    def fn(x_, *ps):
        return torch.func.functional_call(head, dict(zip(names, ps)), (x_, labels if with_labels else None))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def check_probe_cosine(head, x, labels=None):
    """The head's ``cosine`` equals the float64 cosines between features and class weights (after a forward,
    which for some heads edits W: SphereFace's official mode makes its rows unit)."""
    head.eval()
    head(x, labels)
    expected = reference_cosine(x, head.weight.detach())
    torch.testing.assert_close(head.cosine(x).double(), expected, atol=1e-5, rtol=1e-5)


def instantiate(name: str, in_features: int = 8, num_classes: int = 10, **overrides):
    """Builds configs/head/<name>.yaml as the builder does, with optional overrides."""
    cfg = OmegaConf.load(HEAD_CONFIGS / f"{name}.yaml")
    for key, value in overrides.items():
        cfg[key] = value
    return build_head(resolve_head(cfg), in_features, num_classes)


def acos_sizes(head, x, labels) -> list[int]:
    """The number of elements of every ``torch.acos`` call in one training forward of ``head``."""
    sizes, real_acos = [], torch.acos

    def spy(t, *args, **kwargs):
        sizes.append(t.numel())
        return real_acos(t, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "acos", spy)
        head.train()(x, labels)
    return sizes


def copy_weights(src, dst):
    """Gives dst the same class weights (and bias where both have one) as src."""
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(src, "bias", None) is not None and getattr(dst, "bias", None) is not None:
            dst.bias.copy_(src.bias)
    return dst


@pytest.fixture
def hh():
    torch.manual_seed(0)
    return SimpleNamespace(
        make_batch=make_batch,
        reference_cosine=reference_cosine,
        feature_at_angle=feature_at_angle,
        check_bf16=check_bf16,
        check_loss_bf16=check_loss_bf16,
        train_and_resume=train_and_resume,
        gradcheck_head=gradcheck_head,
        check_probe_cosine=check_probe_cosine,
        instantiate=instantiate,
        copy_weights=copy_weights,
        acos_sizes=acos_sizes,
    )
