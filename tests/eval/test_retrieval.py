"""Retrieval metrics (marginlab.eval.retrieval): equal to pytorch-metric-learning, ties included, in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError, DataError
from marginlab.eval import retrieval
from marginlab.eval.retrieval import blocked_search, nearest, retrieval_metrics
from tests.conftest import hide_module

BACKENDS = ("faiss", "torch")
PML_KEYS = {"precision_at_1": "precision_at_1", "r_precision": "r_precision", "map_at_r": "mean_average_precision_at_r"}


def sign_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """+-1 entries: normalised they are +-1/sqrt(dim), every similarity exact, so ties are exact and many."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n, dim), generator=gen) * 2 - 1).float()


def labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def duplicated_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian rows, a third of them exact copies of others: ties at every distance, self not always first."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n - n // 3, dim, generator=gen)
    return torch.cat([base, base[torch.randint(0, len(base), (n // 3,), generator=gen)]])[
        torch.randperm(n, generator=gen)
    ]


def pml_metrics(query, query_labels, reference=None, reference_labels=None) -> dict[str, float]:
    """pytorch-metric-learning's AccuracyCalculator as Musgrave et al. run it, on normalised embeddings."""
    accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    calc = accuracy_calculator.AccuracyCalculator(
        include=tuple(PML_KEYS.values()), avg_of_avgs=False, k="max_bin_count"
    )
    ref = None if reference is None else F.normalize(reference, dim=1)
    got = calc.get_accuracy(F.normalize(query, dim=1), query_labels, ref, reference_labels)
    return {ours: got[theirs] for ours, theirs in PML_KEYS.items()}


def brute_force_neighbours(query, reference=None) -> np.ndarray:
    """Full similarity matrix, every reference ranked by (-similarity, index); the query itself dropped."""
    q = F.normalize(query, dim=1).double().numpy()
    r = q if reference is None else F.normalize(reference, dim=1).double().numpy()
    # similarities to the distinct rows, copied out: a BLAS product may round equal columns differently
    distinct, copy_of = np.unique(r, axis=0, return_inverse=True)
    sim = (q @ distinct.T)[:, copy_of.ravel()]
    order = np.stack([np.lexsort((np.arange(len(r)), -row)) for row in sim])
    if reference is None:
        order = np.stack([row[row != i] for i, row in enumerate(order)])
    return order


def brute_force_recall(query, query_labels, reference=None, reference_labels=None, ks=(1, 2, 4, 8)):
    """Recall@k: queries with a same-label reference among their k nearest, over queries that have one."""
    order = brute_force_neighbours(query, reference)
    ref_labels = (query_labels if reference is None else reference_labels).numpy()
    same = ref_labels[order] == query_labels.numpy()[:, None]
    scored = same.any(axis=1)
    return {f"recall_at_{k}": same[scored, :k].any(axis=1).mean() for k in ks}


CASES = {
    "sign, query = reference": lambda: (sign_embeddings(300, 4, 0), labels(300, 25, 1), None, None),
    "duplicates, query = reference": lambda: (duplicated_embeddings(300, 8, 2), labels(300, 40, 3), None, None),
    # In-Shop style: query and gallery apart; labels 30..39 of the queries have no gallery image (left out)
    "sign, separate reference": lambda: (
        sign_embeddings(120, 4, 4),
        labels(120, 40, 5),
        sign_embeddings(400, 4, 6),
        labels(400, 30, 7),
    ),
    "duplicates, separate reference": lambda: (
        duplicated_embeddings(150, 8, 8),
        labels(150, 30, 9),
        duplicated_embeddings(300, 8, 8),
        labels(300, 30, 9),
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_metrics_equal_pytorch_metric_learning_ties_included(case, backend):
    query, query_labels, reference, reference_labels = CASES[case]()
    ours = retrieval_metrics(query, query_labels, reference, reference_labels, backend=backend)
    theirs = pml_metrics(query, query_labels, reference, reference_labels)
    # the same per-query float64 values; only the order of a row sum may differ (extra zero columns)
    assert {key: ours[key] for key in PML_KEYS} == pytest.approx(theirs, abs=1e-12, rel=0)
    assert ours["map_at_r"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_recall_at_k_equals_brute_force(case, backend):
    query, query_labels, reference, reference_labels = CASES[case]()
    ours = retrieval_metrics(query, query_labels, reference, reference_labels, backend=backend)
    expected = brute_force_recall(query, query_labels, reference, reference_labels)
    assert {key: ours[key] for key in expected} == pytest.approx(expected, abs=1e-12, rel=0)
    assert ours["recall_at_1"] == pytest.approx(ours["precision_at_1"], abs=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_both_backends_return_the_brute_force_neighbours_ties_by_index(case):
    query, _, reference, _ = CASES[case]()
    k = 40
    expected = torch.from_numpy(brute_force_neighbours(query, reference)[:, :k])
    for backend in BACKENDS:
        found = nearest(query, k, reference, backend=backend, memory_budget=len(query) * 16 * 7)
        assert torch.equal(found, expected), backend


def test_gaussian_neighbours_agree_between_backends():
    gen = torch.Generator().manual_seed(10)
    query, reference = torch.randn(200, 32, generator=gen), torch.randn(500, 32, generator=gen)
    assert torch.equal(nearest(query, 20, reference, backend="faiss"), nearest(query, 20, reference, backend="torch"))
    assert torch.equal(nearest(query, 20, backend="faiss"), nearest(query, 20, backend="torch"))


def test_negative_zero_and_positive_zero_similarity_tie_by_index():
    # e0 . -e1 = -0.0 and e0 . e1 = +0.0: equal similarities, so the smaller index ranks first
    query = torch.tensor([[1.0, 0.0]])
    reference = torch.tensor([[0.0, -1.0], [0.0, 1.0], [-1.0, 0.0]])
    assert nearest(query, 3, reference, backend="torch").tolist() == [[0, 1, 2]]


def test_blocked_search_stays_in_its_budget_and_equals_the_full_search(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    query, reference = F.normalize(torch.randn(97, 16, generator=gen), dim=1), F.normalize(torch.randn(300, 16), dim=1)
    budget = 300 * retrieval.BYTES_PER_ENTRY * 10  # ten query rows
    blocks = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        blocks.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    found = blocked_search(query, reference, 12, memory_budget=budget)
    monkeypatch.undo()
    assert len(blocks) == 10 and max(blocks) * retrieval.BYTES_PER_ENTRY <= budget
    full = blocked_search(query, reference, 12, memory_budget=2**30)
    assert torch.equal(found, full)
    assert torch.equal(found, torch.from_numpy(brute_force_neighbours(query, reference)[:, :12]))


def peak_tensor_bytes(fn) -> int:
    """The most bytes of CPU tensors alive at once while ``fn()`` runs (torch profiler's allocation records)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage  # + allocated by the op itself, - freed
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("ties", [False, True])
def test_blocked_search_peak_memory_stays_in_its_budget(ties):
    n, budget = 6000, 64 * 2**20  # the full float32 similarity matrix would be 137 MiB
    gen = torch.Generator().manual_seed(12)
    emb = F.normalize(sign_embeddings(n, 16, 12) if ties else torch.randn(n, 16, generator=gen), dim=1)
    peak = peak_tensor_bytes(lambda: blocked_search(emb, emb, 5, memory_budget=budget))
    # without ties one float32 block (4 of the 16 bytes an entry) lives at a time; it was two blocks when the
    # next was computed before the last was freed. With ties: the block's copy and an int64 key (12 of 16).
    assert peak <= (0.75 if ties else 0.25) * budget * 1.05


def test_without_faiss_auto_falls_back_to_torch_and_faiss_is_refused(monkeypatch):
    query, query_labels, _, _ = CASES["sign, query = reference"]()
    with_faiss = retrieval_metrics(query, query_labels)
    hide_module(monkeypatch, "faiss")
    assert retrieval_metrics(query, query_labels) == with_faiss
    with pytest.raises(ConfigError, match="backend=faiss needs faiss: pip install faiss-cpu"):
        retrieval_metrics(query, query_labels, backend="faiss")


def test_lone_queries_are_left_out_and_counted():
    query, query_labels, reference, reference_labels = CASES["sign, separate reference"]()
    got = retrieval_metrics(query, query_labels, reference, reference_labels)
    assert got["num_queries"] == int((query_labels < 30).sum()) < len(query)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"query_labels": torch.arange(9)}, DataError, "query_labels has 9 labels for 10 embeddings"),
        ({"query_labels": torch.zeros(10)}, DataError, "query_labels must be a 1-D integer array"),
        ({"query": torch.zeros(10)}, DataError, r"query must be a non-empty \(N, D\) float array"),
        ({"query": torch.full((10, 4), float("nan"))}, DataError, "query has NaN or infinite values"),
        ({"reference": torch.ones(5, 4)}, DataError, "give reference and reference_labels together"),
        (
            {"reference": torch.ones(5, 3), "reference_labels": torch.arange(5)},
            DataError,
            "dimension 4 but reference has 3",
        ),
        ({"query_labels": torch.arange(10)}, DataError, "no query has a reference with its label"),
        ({"backend": "annoy"}, ConfigError, "backend='annoy' is not one of auto, faiss, torch"),
        ({"ks": (1, 0)}, ConfigError, r"ks=\(1, 0\) is not allowed"),
        ({"backend": "torch", "memory_budget": 100}, ConfigError, "memory_budget=100 is not allowed: one query row"),
    ],
)
def test_bad_input_is_one_clear_error(kwargs, error, message):
    args = {"query": torch.randn(10, 4), "query_labels": torch.arange(10) % 3} | kwargs
    with pytest.raises(error, match=message):
        retrieval_metrics(**args)


def test_memory_benchmark_runs_at_toy_size():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "retrieval_memory.py"
    args = ["--n", "600", "--dim", "8", "--classes", "60", "--budget-mib", "1"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    header, *results = (json.loads(line) for line in done.stdout.splitlines())
    assert header["n"] == 600 and [r["backend"] for r in results] == ["torch", "faiss"]
    assert results[0]["map_at_r"] == results[1]["map_at_r"] and results[0]["peak_rss_mib"] > 0
