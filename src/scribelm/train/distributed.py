"""Several processes, one training run: DDP and FSDP under `torchrun`.

`torchrun --nproc-per-node N` starts N copies of the same program and gives
each the environment variables RANK, LOCAL_RANK and WORLD_SIZE. Every copy
builds the same model from the same seed, reads its own slice of every
global batch, and computes gradients on it; DDP then averages the gradients
across processes (an all-reduce) before the optimizer step, so all copies
take the same step. Same global batch, same mean gradient: the loss curve
matches one process reading the whole batch, up to float summation order.

FSDP (`fully_shard`) goes further for models that do not fit one device:
each process keeps only a shard of every parameter, gradient and optimizer
state, gathering a block's full weights just before it runs.

Backends: NCCL between GPUs, gloo on CPU. Without torchrun (no WORLD_SIZE)
everything here is a no-op and training runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_info() -> WorldInfo:
    """This process's place in the run, from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return WorldInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())
    return WorldInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def init_distributed(device_type: str) -> WorldInfo:
    """Join the process group torchrun set up (idempotent); one process: nothing to do."""
    info = world_info()
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return world_info()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all processes (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return [v / world for v in all_reduce_sum(values, device)]


def broadcast_object(obj, src: int = 0):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def wrap_model(model: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """DDP or FSDP around `model` when running under torchrun; the model itself otherwise."""
    info = world_info()
    if not info.distributed or strategy == "none":
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", []):
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
