"""Checks the new heads' tests share: a loss and its gradients in float64, and training + resume through the CLI."""

from __future__ import annotations

import torch

from tests.conftest import train_straight_and_resumed
from tests.test_resume import assert_same_run


def check_resume_exact(run_train, metrics, tmp_path, monkeypatch, *overrides: str) -> dict:
    """Trains ``overrides`` for 2 epochs, then again stopped after 1 and resumed; the weights (head state included)
    and the per-epoch records must be equal. Returns the straight run's last record."""
    run = ["logger=quiet", "trainer.epochs=2", "sched=cosine", *overrides]
    straight, split = train_straight_and_resumed(run_train, tmp_path, monkeypatch, *run)
    return assert_same_run(straight, split, metrics)[-1]


def chunked_and_partial_fc_errors(run_train, capfd, head: str) -> tuple[str, str]:
    """The first error line of ``marginlab train head=<head>`` with chunked CE, then with Partial FC (each exit 2)."""
    assert run_train(f"head={head}", "+head.chunked=true", "logger=quiet")[0] == 2
    assert run_train(f"head={head}", "+head.partial_fc.sample_rate=0.5", "logger=quiet")[0] == 2
    err = capfd.readouterr().err.splitlines()
    return err[0], err[1]


def loss_and_grads(fn, x, weight) -> tuple:
    """(fn(x, weight), d/dx, d/dweight) on fresh float64 leaves: for comparing a head with a reference port."""
    x, weight = x.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    loss = fn(x, weight)
    return (loss, *torch.autograd.grad(loss, [x, weight]))


def float64_batch(seed: int = 0, b: int = 16, d: int = 8, c: int = 10) -> tuple:
    """(B x D float64 features, B labels in [0, C)) from their own seeded stream."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)
