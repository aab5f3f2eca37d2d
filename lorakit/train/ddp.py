"""Data parallelism without wrapping the model: each process runs its slice of every global batch, then one
all-reduce per step sums the adapter gradients (and the step's loss and token counts) across processes.

Only adapter gradients travel; the frozen base never does. Started by ``torchrun`` (which sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); gloo on CPU, NCCL when the run's device is a GPU (one
process per GPU: ``--device auto`` is ``cuda:$LOCAL_RANK``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    size: int = 1
    lockstep: bool = False  # every process must run the same forwards (a sharded base: lorakit.train.fsdp)

    @property
    def main(self) -> bool:
        """The process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: Sequence[T], batch_size: int) -> list[T]:
        """This process's contiguous share of a micro-batch of ``batch_size`` items."""
        per = batch_size // self.size
        return list(items[self.rank * per:(self.rank + 1) * per])

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.size:
            raise TrainingError(f"--batch-size {batch_size} must be divisible by the number of processes "
                                f"({self.size}); it is the global micro-batch, split evenly across processes")

    def all_reduce(self, flat: Tensor) -> Tensor:
        """Sum ``flat`` over all processes in place (a no-op in a single process); NCCL reduces a host tensor
        through this process's GPU."""
        if self.distributed:
            if dist.get_backend() == "nccl" and not flat.is_cuda:
                on_gpu = flat.to(f"cuda:{torch.cuda.current_device()}")
                dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
                flat.copy_(on_gpu)
            else:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat

    def broadcast(self, tensors: Sequence[Tensor]) -> None:
        """Copy the main process's values of ``tensors`` to every process (identical adapters at the start)."""
        if self.distributed:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = World()  # a process on its own


def init_world(device: torch.device | None = None) -> World:
    """Join the process group that ``torchrun`` describes in the environment (a single process otherwise): NCCL
    when ``device`` is a GPU (made this process's current one), gloo otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device is not None and device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def sync_gradients(world: World, params: Sequence[Tensor], extras: Sequence[float]) -> list[float]:
    """Sum the gradients of ``params`` and the numbers ``extras`` over processes with one all-reduce.

    Returns the summed extras. Parameters without a gradient (unused on this step) count as zeros.
    """
    if not world.distributed:
        return list(extras)
    params = [p for p in params if p.requires_grad]  # frozen for now (LISA): no gradient, no optimizer state
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = grads[0].device if grads else torch.device("cpu")
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor(extras, dtype=torch.float32,
                                                                            device=device)])
    world.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
    return flat[offset:].tolist()
