"""Training across processes: Partial FC (class weights sharded over ranks, sampled negatives)."""

from marginlab.distributed.partial_fc import (
    PartialFC,
    all_gather_with_grad,
    build_partial_fc,
    dist_cross_entropy,
    shard_range,
)

__all__ = ["PartialFC", "all_gather_with_grad", "build_partial_fc", "dist_cross_entropy", "shard_range"]
