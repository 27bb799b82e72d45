"""A head's end-to-end check through the real CLI: 2 epochs straight == 1 epoch + ``resume=latest``, bit for bit."""

from __future__ import annotations

import torch

from tests.test_resume import TIMES, weights


def check_resume_exact(run_train, metrics, tmp_path, monkeypatch, *overrides: str) -> dict:
    """Trains ``overrides`` for 2 epochs, then again stopped after 1 and resumed; the weights (head state included)
    and the per-epoch records must be equal. Returns the straight run's last record."""
    run = ["logger=quiet", "trainer.epochs=2", "sched=cosine", *overrides]
    code, straight = run_train(*run)
    assert code == 0
    monkeypatch.setenv("MARGINLAB_OUTPUT_DIR", str(tmp_path / "second"))
    code, _ = run_train(*run, "trainer.stop_after_epoch=1")
    assert code == 0
    code, _ = run_train("resume=latest")
    assert code == 0
    split = next((tmp_path / "second" / "runs").iterdir())
    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = metrics[1](straight), metrics[1](split)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in TIMES} == {k: v for k, v in rb.items() if k not in TIMES}
    return rows_a[-1]
