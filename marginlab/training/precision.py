"""The run's arithmetic as one object, ``Precision``: autocast (where and in which dtype) and one optimizer step
under it (scaled backward, unscale and clip, step, scale update), as timm's NativeScaler does
(huggingface/pytorch-image-models, timm/utils/cuda.py, 522c9ea); and every rule of ``trainer.precision`` but
its allowed values (the enum in config/schema.py)."""

from __future__ import annotations

import contextlib

import torch

from marginlab.distributed.runtime import DistContext
from marginlab.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on CUDA, 32 elsewhere; any other setting as given."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "32"
    return name


class Precision:
    """Where and how the arithmetic runs: device, autocast dtype (None = float32), GradScaler (fp16 only)."""

    def __init__(self, device: torch.device, name: str):
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("trainer.precision='fp16' needs CUDA; on CPU use 32 or bf16")
        self.device, self.name = device, name  # name: "32" | "bf16" | "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    @classmethod
    def from_setting(cls, setting: str, device: torch.device) -> Precision:
        """The precision ``trainer.precision=<setting>`` runs with on ``device`` (``auto`` resolved)."""
        return cls(device, resolve_precision(setting, device))

    def check_sharded(self, sharded: bool) -> None:
        """``sharded``: the head's weights differ per rank (Partial FC on several processes)."""
        if sharded and self.name == "fp16":  # GradScaler would decide to skip a step per rank, from its own shard
            raise ConfigError(
                "trainer.precision='fp16' is not allowed with head.partial_fc on several processes: "
                "use trainer.precision=bf16 (no loss scaling) or 32"
            )

    def autocast(self):
        if self.name == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.name])

    def __call__(
        self, loss, optimizer, clip_grad: float | None = None, parameters=(), dist=DistContext(), sharded=()
    ) -> None:
        """One optimizer step from ``loss``: backward (scaled under fp16), then, with ``clip_grad``, the gradients
        unscaled and ``parameters``' global norm clipped (``clip_gradients``), then the step and the scale update
        (GradScaler skips a step whose gradients are not finite)."""
        self.scaler.scale(loss).backward()
        if clip_grad:
            self.scaler.unscale_(optimizer)
            clip_gradients(parameters, clip_grad, dist, sharded)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)


def clip_gradients(parameters, max_norm: float, dist: DistContext, sharded=()) -> None:
    """Clips the global gradient norm. ``sharded``: the parameters each rank holds a different shard of
    (``criterion.sharded_parameters()``); their norm sums the squares of every rank's shard, so all ranks scale by
    the same factor (the backbone's gradients, identical on every rank, count once)."""
    params = [p for p in parameters if p.grad is not None]
    if not (dist.enabled and sharded):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    sharded = {id(p) for p in sharded}
    shard_sq = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in sharded]) ** 2
    dist.all_reduce_sum(shard_sq)
    rest = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in sharded])
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, (rest**2 + shard_sq).sqrt())
