"""Running a large inference batch in chunks, so that each chunk's activations stay in cache.

A network's batch-32 activations at ImageNet sizes are tens of MB per layer, larger than the
caches: each layer then reads its input from memory and writes its output back, and on a CPU the
memory traffic, not the arithmetic, sets the time. A few samples at a time keep a layer's input
and output in the caches, and the per-call cost of the kernels is small next to a chunk's work.
BFT networks gain more than dense ones because at equal multiply-adds they are wider (more
activation bytes per multiply-add). :func:`butterfly.optimize_for_inference` measures the chunk
sizes on the example input and wraps the network in :class:`BatchChunks` when one is faster.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["BatchChunks", "batch_size"]


def batch_size(args: Sequence) -> Optional[int]:
    """The batch size shared by ``args``: every argument a tensor with at least one dimension
    and the same first dimension; None otherwise (such a call is not split)."""
    if not args or not all(isinstance(a, Tensor) and a.dim() > 0 for a in args):
        return None
    n = args[0].shape[0]
    return n if all(a.shape[0] == n for a in args) else None


class BatchChunks(nn.Module):
    """``module`` run on at most ``chunk`` samples at a time, its outputs concatenated along
    the first dimension: ``cat([module(x[i:i + chunk]) for i in range(0, len(x), chunk)])``.

    For inference: ``module`` must treat every sample on its own (eval mode: no batch
    statistics) and return one tensor whose first dimension is the batch. A call whose
    arguments are not tensors sharing their first dimension, or whose batch is at most
    ``chunk``, runs ``module`` unchanged."""

    def __init__(self, module: nn.Module, chunk: int):
        super().__init__()
        if int(chunk) < 1:
            raise ValueError(f"BatchChunks: chunk must be a positive number of samples, "
                             f"got {chunk}")
        self.module, self.chunk = module, int(chunk)

    def forward(self, *args) -> Tensor:
        n = batch_size(args)
        if n is None or n <= self.chunk:
            return self.module(*args)
        outs = [self.module(*(a[i:i + self.chunk] for a in args))
                for i in range(0, n, self.chunk)]
        if not all(isinstance(o, Tensor) for o in outs):
            raise TypeError(f"BatchChunks: the wrapped module returned "
                            f"{type(outs[0]).__name__}, not one tensor per chunk; unwrap it "
                            "(.module) to run it on the whole batch")
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"chunk={self.chunk}"
