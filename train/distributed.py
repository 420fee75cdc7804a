"""Process-group setup for ``torchrun`` (nccl on GPU, gloo on CPU) and small collective helpers.

Launched without ``torchrun`` everything is a one-process no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class Context:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: Optional[str] = None) -> Context:
    """Read torchrun's environment, pick the device, and join the process group if there are peers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but torch sees no CUDA GPU")
        dev = torch.device("cuda", local_rank if world > 1 else torch.device(kind).index or 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(kind)
    if world > 1 and not dist.is_initialized():
        cuda = dev.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30),
                                device_id=dev if cuda else None)
    return Context(rank, world, local_rank, dev)


def cleanup(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def sum_across(ctx: Context, values: Sequence[float]) -> List[float]:
    """Element-wise sum of ``values`` over all ranks (float64, so counts stay exact)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(t)
    return t.tolist()


def gather_objects(ctx: Context, obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not ctx.distributed:
        return [obj]
    out: List[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
