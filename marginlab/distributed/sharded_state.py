"""Model and optimizer state in the unsharded layout, whether or not the head is a Partial FC shard.

A checkpoint written by N ranks with Partial FC holds exactly what a plain run's holds: ``head.weight``
with every class, the optimizer's per-row state (momentum, Adam moments) likewise. So it resumes with
any number of ranks, with or without Partial FC, and ``marginlab eval`` reads it as any other.
Every function here is a collective when the head is sharded over several ranks: all ranks call it.
"""

from __future__ import annotations

import torch
from torch import nn

from marginlab.distributed.partial_fc import PartialFC


def _shard(model: nn.Module) -> PartialFC | None:
    return model.head if isinstance(model.head, PartialFC) else None


def model_state_dict(model: nn.Module) -> dict | None:
    """``model.state_dict()`` as the unsharded model's; None on ranks other than 0 when the head is sharded."""
    pfc = _shard(model)
    if pfc is None:
        return model.state_dict()
    head = pfc.full_state_dict()
    if head is None:
        return None
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    state.update({f"head.{k}": v for k, v in head.items()})
    return state


def unsharded_shapes(model: nn.Module) -> dict[str, list[int]]:
    """key -> shape of ``model_state_dict(model)``'s tensors, without collectives (a shard counts every class)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    pfc = _shard(model)
    if pfc is None:
        return shapes
    shapes = {k: s for k, s in shapes.items() if not k.startswith("head.")}
    for k, v in pfc.head.state_dict().items():
        shapes[f"head.{k}"] = [pfc.num_classes * pfc.sub_centers, *v.shape[1:]] if k == "weight" else list(v.shape)
    return shapes


def load_model_state_dict(model: nn.Module, state: dict) -> None:
    pfc = _shard(model)
    if pfc is None:
        model.load_state_dict(state)
        return
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("head.")}, strict=False
    )
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:  # the message torch's strict loading would give
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing}, unexpected keys {unexpected}")
    pfc.load_full_state_dict(head)


def _param_index(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> int | None:
    """The index ``optimizer.state_dict()`` gives ``param`` (parameters numbered across groups in order)."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return index
            index += 1
    return None


def optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict | None:
    """``optimizer.state_dict()`` with the sharded weight's per-row state gathered; None off rank 0 when sharded."""
    state = optimizer.state_dict()
    pfc = _shard(model)
    if pfc is None:
        return state
    index = _param_index(optimizer, pfc.weight)
    per_param = state["state"].get(index, {})
    gathered = {}
    for key, value in per_param.items():  # the same keys in the same order on every rank
        is_rows = torch.is_tensor(value) and value.shape == pfc.weight.shape
        gathered[key] = pfc.gather_rows(value) if is_rows else value
    if pfc.rank != 0:
        return None
    if per_param:
        state["state"][index] = gathered
    return state


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, model: nn.Module, state: dict) -> None:
    pfc = _shard(model)
    if pfc is not None:
        index = _param_index(optimizer, pfc.weight)
        full_rows = pfc.num_classes * pfc.sub_centers
        per_param = state["state"].get(index)
        if per_param:
            state = {
                **state,
                "state": {
                    **state["state"],
                    index: {
                        k: pfc.shard_rows(v) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == full_rows else v
                        for k, v in per_param.items()
                    },
                },
            }
    optimizer.load_state_dict(state)
