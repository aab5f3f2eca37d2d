"""``--fsdp``: the frozen base sharded over the processes with FSDP2 (``torch.distributed.fsdp.fully_shard``), the
adapters replicated and trained as in data parallelism (:mod:`.ddp`).

Each transformer block (the classes a transformers model lists in ``_no_split_modules``) and then the root become
FSDP2 modules over a one-dimensional device mesh of all processes: every process keeps ``1/N`` of each frozen weight
and all-gathers a block's weights just before its forward (and again before its backward), freeing them after. The
adapters' parameters are ``ignored_params``: they stay whole on every process, their gradients are summed by the
same single all-reduce as without FSDP, and saving, checkpoints and training hooks that resize ranks see ordinary
tensors. Only frozen weights are sharded, so no gradient is ever reduce-scattered.

Every process must run the same forwards in the same order (a block's all-gather is a collective):
:attr:`~lorakit.train.ddp.World.lockstep` makes evaluation pad the processes' shares to the same number of batches.
"""
from __future__ import annotations

import torch
from torch import nn

from .ddp import World
from .errors import TrainingError


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: instances of the classes in transformers' ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise TrainingError(f"--fsdp: {type(model).__name__} names no transformer block class "
                            f"(_no_split_modules); FSDP needs one to shard the model block by block")
    return found


def shard_frozen_base(model: nn.Module, world: World, device: torch.device) -> tuple[int, int]:
    """Shard ``model``'s frozen weights over ``world`` block by block onto ``device`` (FSDP2 moves each process's
    shards there), and move the trainable ones, kept whole, there too. Returns ``(held, total)``: the frozen
    elements this process holds and the model has."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    trained = {p for p in model.parameters() if p.requires_grad}
    with torch.no_grad():
        for param in trained:
            param.data = param.data.to(device)
    try:
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, ignored_params=trained)
        fully_shard(model, mesh=mesh, ignored_params=trained)
    except AssertionError as err:  # torchao's NF4 split asserts that each inner tensor divides evenly
        raise TrainingError(f"--fsdp: the quantised base does not split evenly over {world.size} processes ({err}); "
                            f"use a process count that divides its blocks, or data parallelism (torchrun without "
                            f"--fsdp)") from err
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return sum(_local(p).numel() for p in frozen), sum(p.numel() for p in frozen)


def _local(param: torch.Tensor) -> torch.Tensor:
    """This process's shard of ``param`` (a ``DTensor`` once sharded), or ``param`` itself."""
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param
