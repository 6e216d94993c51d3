"""Data-parallel wrappers for training under ``torchrun``: DDP, or FSDP (``fully_shard``).

Checkpoints always hold the plain, unwrapped state dicts a single process writes (parameter
names without ``module.``, optimiser state keyed by parameter index), so a checkpoint moves
freely between one process, DDP and FSDP.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions
from torch.nn.parallel import DistributedDataParallel

from cait.runtime import DistInfo
from cait.training.config import PARALLEL_MODES, ParallelMode

__all__ = [
    "is_sharded",
    "load_optimizer_state",
    "model_state_dict",
    "optimizer_state_dict",
    "unwrap",
    "wrap_model",
]

logger = logging.getLogger(__name__)


def wrap_model(
    model: nn.Module, parallel: ParallelMode, info: DistInfo, device: torch.device
) -> nn.Module:
    """``model`` (already on ``device``) made data-parallel over ``info.world_size`` ranks.

    ``ddp``: DistributedDataParallel, which broadcasts rank 0's weights at construction and
    averages gradients in the backward pass. ``fsdp``: ``fully_shard`` on every SA and CA
    block and then on the root, so each rank holds ``1 / world`` of the weights, gradients
    and optimiser state and gathers one block at a time. FSDP does not broadcast: every rank
    must build identical weights (same seed, same checkpoint). Returns ``model`` unchanged on
    one process. Build the optimiser after this call: FSDP replaces the parameters.
    """
    if info.world_size == 1:
        return model
    if parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {list(PARALLEL_MODES)}, got {parallel!r}")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = [
        *getattr(model, "blocks", []),
        *getattr(model, "blocks_token_only", []),
    ]
    if not blocks:
        raise ValueError("parallel=fsdp shards a model's blocks; this model has none")
    mesh = init_device_mesh(device.type, (info.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    logger.info("FSDP: %d blocks and the root sharded over %d ranks", len(blocks), info.world_size)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (FSDP keeps the model's own class and parameter names)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _full_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain, full state dict. Under FSDP this is a collective (call it on every rank)
    and only rank 0 receives the tensors (on the CPU); the others get ``{}``."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order of the optimiser's groups: index ``i`` of a plain
    ``optimizer.state_dict()`` is ``names[i]``."""
    by_id = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as one process writes it (state keyed by index). Under
    FSDP a collective: the full state is gathered to rank 0 and re-keyed from names to
    indices; the other ranks get ``{}``."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if "state" not in full:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {
        "state": {index[name]: s for name, s in full["state"].items()},
        "param_groups": [
            {**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a plain (index-keyed) optimiser state, sharding it first under FSDP."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    by_name = {
        "state": {names[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, by_name, options=StateDictOptions(full_state_dict=True)
    )
