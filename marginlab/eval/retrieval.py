"""Image-retrieval metrics of metric learning (SOP, CUB, Cars, In-Shop) in bounded memory.

Precision@1, R-precision, MAP@R and Recall@k as Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020)
define them, equal to pytorch-metric-learning's ``AccuracyCalculator``, ties included; the neighbour search
never holds the N x N similarity matrix. Definitions, tie order and memory: docs/metric-learning.md, "The
metrics, exactly".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from marginlab.errors import ConfigError, DataError

DEFAULT_KS = (1, 2, 4, 8)
DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes for the torch search's similarity block (1 GiB)
# bytes per (query, reference) entry of a torch block, with room to spare: a float32 similarity (4); for rows
# with ties, its copy and an int32 sign mask (8), then the copy and an int64 sort key (12)
BYTES_PER_ENTRY = 16
BACKENDS = ("auto", "faiss", "torch")
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection handles k <= 2048 (faiss/gpu/utils/DeviceDefs.cuh)


def retrieval_metrics(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    *,
    ks: tuple[int, ...] = DEFAULT_KS,
    backend: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> dict[str, float]:
    """Precision@1, R-precision, MAP@R and Recall@k of ``query`` against ``reference`` (docs/metric-learning.md).

    Args:
        query: (Nq, D) embeddings (torch tensor or numpy array); L2-normalised here.
        query_labels: (Nq,) integer class labels.
        reference: (Nr, D) embeddings to search (In-Shop's gallery), or None: the queries search each other,
            each query's own row excluded.
        reference_labels: (Nr,) integer labels; given exactly when ``reference`` is.
        ks: the k of ``recall_at_<k>``.
        backend: ``"faiss"``, ``"torch"`` (blocked search on the embeddings' device) or ``"auto"`` (faiss
            when installed, else torch).
        memory_budget: bytes the torch search may use for its similarity block.

    Returns:
        ``{"precision_at_1", "r_precision", "map_at_r", "recall_at_<k>" for k in ks, "num_queries"}``:
        floats in [0, 1]; ``num_queries`` is the number of queries scored (those with a same-label reference).

    Raises:
        DataError: mismatched shapes or lengths, non-finite embeddings, or no query with a same-label reference.
        ConfigError: an unknown ``backend``, ``backend="faiss"`` without faiss, a bad ``ks`` or ``memory_budget``.
    """
    query, query_labels = _embeddings(query, "query"), _labels(query_labels, "query_labels", len(query))
    self_excluded = reference is None
    if self_excluded != (reference_labels is None):
        raise DataError("retrieval: give reference and reference_labels together, or neither (query = reference)")
    if self_excluded:
        reference, reference_labels = query, query_labels
    else:
        reference = _embeddings(reference, "reference").to(query.device)
        reference_labels = _labels(reference_labels, "reference_labels", len(reference))
        if reference.shape[1] != query.shape[1]:
            raise DataError(f"retrieval: query has dimension {query.shape[1]} but reference has {reference.shape[1]}")
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"retrieval: ks={ks!r} is not allowed: give positive integers, e.g. (1, 2, 4, 8)")

    # R per query: the references sharing its label, less itself when the queries are the references
    classes, counts = torch.unique(reference_labels, return_counts=True)
    pos = torch.searchsorted(classes, query_labels).clamp(max=len(classes) - 1)
    r = torch.where(classes[pos] == query_labels, counts[pos], 0) - int(self_excluded)
    scored = r > 0
    if not bool(scored.any()):
        raise DataError("retrieval: no query has a reference with its label: nothing to score")
    # k = the largest class (PML's k="max_bin_count") covers every R; Recall@k may need more
    k = min(max(int(counts.max()) - int(self_excluded), max(ks)), len(reference) - int(self_excluded))
    neighbours = nearest(query, k, None if self_excluded else reference, backend=backend, memory_budget=memory_budget)
    same = (reference_labels[neighbours] == query_labels[:, None])[scored]
    r = r[scored]
    # only the first R of each row count for R-precision and MAP@R (Musgrave et al. 2020, sec. 3.3)
    within_r = torch.arange(k)[None, :] < r[:, None]
    hits = same & within_r
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    precision_at_i = (hits.cumsum(dim=1) * hits).to(torch.float64) / ranks  # P(i) * rel(i)
    metrics = {
        "precision_at_1": same[:, 0].to(torch.float64).mean().item(),
        "r_precision": (hits.sum(dim=1).to(torch.float64) / r).mean().item(),
        "map_at_r": (precision_at_i.sum(dim=1) / r).mean().item(),  # Musgrave et al. 2020, eq. 1
    }
    for kk in ks:  # Recall@K of Song et al. (CVPR 2016): a same-label reference among the k nearest
        metrics[f"recall_at_{kk}"] = same[:, :kk].any(dim=1).to(torch.float64).mean().item()
    metrics["num_queries"] = int(scored.sum())
    return metrics


def nearest(
    query,
    k: int,
    reference=None,
    *,
    backend: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """The (Nq, k) indices of each query's k most cosine-similar references, nearest first, ties by index.

    ``reference`` None: the queries search each other and a query never lists itself. Indices come back on
    CPU. ``backend`` and ``memory_budget`` as in [retrieval_metrics][marginlab.eval.retrieval.retrieval_metrics].
    """
    if backend not in BACKENDS:
        raise ConfigError(f"retrieval: backend={backend!r} is not one of {', '.join(BACKENDS)}")
    query = F.normalize(_embeddings(query, "query"), dim=1)
    self_excluded = reference is None
    reference = query if self_excluded else F.normalize(_embeddings(reference, "reference").to(query.device), dim=1)
    wanted = k + int(self_excluded)  # the query itself is among its own nearest
    if not 1 <= wanted <= len(reference):
        raise ConfigError(f"retrieval: k={k} is not allowed: {len(reference) - int(self_excluded)} references")
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ConfigError("retrieval: backend=faiss needs faiss: pip install faiss-cpu (or use backend=torch)")
    if faiss is not None:
        found = _faiss_search(faiss, query, reference, wanted)
    else:
        found = blocked_search(query, reference, wanted, memory_budget=memory_budget)
    return _drop_self(found) if self_excluded else found


def blocked_search(query: torch.Tensor, reference: torch.Tensor, k: int, *, memory_budget: int) -> torch.Tensor:
    """Top-k references by inner product per query, ties by index, never holding the Nq x Nr matrix.

    Queries go in blocks of ``memory_budget // (Nr * BYTES_PER_ENTRY)`` rows; only each block's k indices
    are kept, so memory is the budget plus (Nq, k) indices. Returns CPU indices, nearest first.
    """
    rows = block_rows(len(reference), memory_budget)
    out = torch.empty((len(query), k), dtype=torch.long)
    # low 32 bits of the sort key: larger for the smaller index, so equal similarities rank by index
    index_key = torch.arange(len(reference) - 1, -1, -1, device=reference.device)
    for start in range(0, len(query), rows):
        sim = query[start : start + rows] @ reference.T
        # one more than k: a tie between the k-th and the next would make the top k a choice
        values, found = sim.topk(min(k + 1, len(reference)), dim=1)
        found = found[:, :k]
        # a row with equal similarities in its top k, or at its edge, is ranked again by (similarity, index)
        tied_rows = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().squeeze(1)
        tied_sim = sim[tied_rows] if len(tied_rows) else None
        del sim  # before the next block's product: two blocks never coexist
        if tied_sim is not None:
            found[tied_rows] = _topk_ties_by_index(tied_sim, index_key, k)
            del tied_sim
        out[start : start + rows] = found.cpu()
    return out


def _topk_ties_by_index(sim: torch.Tensor, index_key: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k of each row of ``sim`` (consumed) by (similarity, then smaller index) via distinct int64 keys."""
    sim += 0.0  # -0.0 -> +0.0: both must get the same key
    bits = sim.view(torch.int32)
    # float -> int32 of the same order: negative floats order backwards, so flip their magnitude bits
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip
    del flip
    key = bits.to(torch.int64)  # the caller's copy of sim stays: 4 + 8 bytes per entry at most
    del sim, bits
    key <<= 32
    key |= index_key
    # the keys are distinct, so the top k and their order are fully determined
    return key.topk(k, dim=1).indices


def block_rows(n_reference: int, memory_budget: int) -> int:
    """Query rows per block of the torch search: as many as ``memory_budget`` bytes hold (at least one)."""
    row_bytes = n_reference * BYTES_PER_ENTRY
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < row_bytes:
        raise ConfigError(
            f"retrieval: memory_budget={memory_budget!r} is not allowed: one query row against "
            f"{n_reference} references needs {row_bytes} bytes"
        )
    return memory_budget // row_bytes


def _faiss():
    """The faiss module, or None where it is not installed (the torch search takes over)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _faiss_search(faiss, query: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    # an exact L2 index on normalised embeddings ranks as cosine; faiss's CPU heaps break ties by smaller id
    index = faiss.IndexFlatL2(query.shape[1])
    if k <= FAISS_GPU_MAX_K and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(_float32(reference))
    _, found = index.search(_float32(query), k)
    return torch.from_numpy(found).long()


def _float32(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)


def _drop_self(found: torch.Tensor) -> torch.Tensor:
    """(N, k+1) -> (N, k): remove each query's own index, or its last neighbour where ties pushed it out."""
    own = found == torch.arange(len(found))[:, None]
    own[~own.any(dim=1), -1] = True
    return found[~own].view(len(found), -1)


def _embeddings(x, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim != 2 or len(x) == 0 or not x.is_floating_point():
        raise DataError(f"retrieval: {name} must be a non-empty (N, D) float array, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"retrieval: {name} has NaN or infinite values")
    return x.float()


def _labels(x, name: str, n: int) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim != 1 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise DataError(f"retrieval: {name} must be a 1-D integer array, got {x.dtype} of shape {tuple(x.shape)}")
    if len(x) != n:
        raise DataError(f"retrieval: {name} has {len(x)} labels for {n} embeddings")
    return x.long()
