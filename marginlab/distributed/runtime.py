"""Data-parallel runtime from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); a no-op in one process.

``torchrun --nproc_per_node=N -m marginlab train ...`` starts N copies; each calls ``DistContext.from_env``.
A single-process run never initialises torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "DistContext":
        """Joins the process group torchrun describes (nccl on CUDA, gloo on CPU); a plain run gets rank 0 of 1."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        ctx = cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return ctx

    def device(self, device: torch.device) -> torch.device:
        """Each process on its own GPU (cuda:LOCAL_RANK); CPU stays CPU."""
        if self.enabled and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_finite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank: all ranks must agree to skip a step or DDP hangs."""
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if self.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()
