"""A data module's retrieval sets scored from the trainer (every evaluated epoch) and from ``marginlab eval``.

Each set of unseen classes (``data.retrieval_loaders()``: ``test``, ``val`` with ``dataset.val_fold``) is embedded
by the backbone -- the trunk's own embedding at its size (``backbone.embedding_dim``), no flip, as the evaluation
of Musgrave et al. 2020, "A Metric Learning Reality Check" (powerful-benchmarker's ``GlobalEmbeddingSpaceTester``
with ``normalize_embeddings``) -- and its images search each other, self excluded. In-Shop's ``query`` set searches
its ``gallery``; the result is named ``test``. Metrics: ``marginlab.eval.retrieval.retrieval_metrics``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from marginlab.errors import DataError
from marginlab.eval.retrieval import retrieval_metrics

#: the metrics kept per set, as ``<set>/<key>`` in metrics.jsonl / TensorBoard (``num_queries`` is a count)
METRICS = ("precision_at_1", "r_precision", "map_at_r", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8")
PRIMARY = "map_at_r"  # the MLRC's selection metric (powerful-benchmarker config_eval/default.yaml primary_metric)


def tasks(names) -> list[tuple[str, str, str | None]]:
    """(result name, query set, reference set or None: the queries search each other) of the sets ``names``."""
    names = list(names)
    if ("query" in names) != ("gallery" in names):
        raise DataError(f"retrieval: sets {names} have a query set without a gallery, or the reverse")
    out = [(name, name, None) for name in names if name not in ("query", "gallery")]
    if "query" in names:
        out.append(("test", "query", "gallery"))
    return out


def check_retrievable(sets: dict) -> None:
    """A DataError before any training when a set has no query that another image shares a class with (nothing
    to score): each set is a dict name -> dataset with ``targets`` or (x, y) items."""
    from marginlab.data.base import dataset_labels

    labels = {name: np.asarray(dataset_labels(dataset)) for name, dataset in sets.items()}
    for result, query, reference in tasks(labels):
        if reference is None:
            scorable = np.unique(labels[query], return_counts=True)[1].max(initial=0) >= 2
        else:
            scorable = np.isin(labels[query], labels[reference]).any()
        if not scorable:
            raise DataError(
                f"retrieval set {result!r} has no image whose class another "
                f"{'image of it' if reference is None else 'gallery image'} shares: nothing to retrieve"
            )


@torch.no_grad()
def embed_loader(backbone, loader, device, autocast=None, channels_last: bool = False):
    """(embeddings float32 on the CPU, labels) of every batch of ``loader``; the backbone runs in eval mode and its
    previous mode is restored. ``autocast``: a context factory (the run's precision), None: float32."""
    from marginlab.training.engine import to_device

    was_training = backbone.training
    backbone.eval()
    out, labels = [], []
    try:
        for batch in loader:
            images, y = to_device(batch, device, channels_last)
            with autocast() if autocast is not None else contextlib.nullcontext():
                out.append(backbone(images).float().cpu())
            labels.append(y.cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out), torch.cat(labels)


def run_retrieval(
    loaders: dict, backbone, device, *, autocast=None, channels_last: bool = False, suffix: str = "", **options
):
    """Embeds each set and scores it; returns the flat scalars (``test/map_at_r``, ...) and each result in full
    (``num_queries`` included). ``backbone``: one net, or a list of nets whose L2-normalised embeddings are set
    side by side (the MLRC's "concatenated" ensemble of the folds' models; ``suffix`` then names the result,
    ``test_concat``). ``options``: ``retrieval_metrics``'s (``backend``, ``memory_budget``, ``ks``)."""
    nets = backbone if isinstance(backbone, (list, tuple)) else [backbone]
    embedded = {}
    for name, loader in loaders.items():
        parts = [embed_loader(net, loader, device, autocast, channels_last) for net in nets]
        # each model's embedding normalised, then joined (powerful-benchmarker ensembles/concatenate_embeddings.py)
        joined = torch.cat([F.normalize(emb, dim=1) for emb, _ in parts], dim=1) if len(parts) > 1 else parts[0][0]
        embedded[name] = (joined, parts[0][1])
    scalars, results = {}, {}
    for name, query, reference in tasks(embedded):
        ref = embedded[reference] if reference is not None else (None, None)
        result = retrieval_metrics(*embedded[query], *ref, **options)
        results[name + suffix] = result
        scalars.update({f"{name}{suffix}/{key}": float(result[key]) for key in METRICS if key in result})
    return scalars, results


def retrieval_line(name: str, result: dict) -> str:
    """A set's printed line: P@1, R-precision, MAP@R and Recall@k, over how many queries."""
    recalls = ", ".join(
        f"R@{k.removeprefix('recall_at_')} {v:.4f}" for k, v in result.items() if k.startswith("recall_at_")
    )
    return (
        f"{name}: P@1 {result['precision_at_1']:.4f}, R-precision {result['r_precision']:.4f}, "
        f"MAP@R {result['map_at_r']:.4f}, {recalls} ({result['num_queries']} queries)"
    )
