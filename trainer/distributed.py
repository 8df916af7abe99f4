"""torchrun's environment -> one process of a data-parallel run, and the collectives a step
needs. The same code runs single-process (world size 1: every helper is then a no-op).

Under DDP, BatchNorm statistics are all-reduced over the global batch with a differentiable
all_reduce (SyncBatchNorm does not run on CPU) and gradients are averaged, so an update equals
the single-process update on the same global batch. gloo on CPU (the tests run it), nccl on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from usae.trainer.objective import LossParts, r2_from_sums

from usae.runtime import resolve_device


class Dist(NamedTuple):
    rank: int
    world: int
    device: torch.device
    owns_group: bool
    """True when this process initialised the process group (and must destroy it)."""


def init_distributed(device: str) -> Dist:
    """Single process, or DDP from torchrun's environment (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world == 1:
        return Dist(0, 1, dev, False)
    owns = not dist.is_initialized()
    if owns:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


def close_distributed(d: Dist) -> None:
    if d.owns_group:
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def mean_over_ranks(x: Tensor, world: int) -> Tensor:
    """The mean of a tensor over the ranks (itself when single-process)."""
    if world == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world


def max_over_ranks(x: Tensor, world: int) -> Tensor:
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is also an all_reduce(SUM): the gradient of the sum of
    every rank's loss with respect to each rank's contribution."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: ARG004 - autograd signature
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # noqa: ARG004
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def batch_norm_global(bn: nn.BatchNorm1d, h_bm: Tensor, track: bool = True) -> Tensor:
    """Training-mode BatchNorm with statistics over the GLOBAL batch of all DDP ranks; `track`
    updates the running statistics (as `batch_norm_local`).

    SyncBatchNorm does not run on CPU; this all-reduces sum and centred sum of squares with a
    differentiable all_reduce, so gradients see the global statistics as well.
    """
    all_reduce = _SumOverRanks.apply
    n = torch.tensor([float(h_bm.shape[0])], device=h_bm.device, dtype=h_bm.dtype)
    dist.all_reduce(n)
    mean_m = all_reduce(h_bm.sum(0)) / n
    var_m = all_reduce((h_bm - mean_m).square().sum(0)) / n
    if track:
        with torch.no_grad():
            mom = bn.momentum
            bn.running_mean.mul_(1 - mom).add_(mean_m.detach(), alpha=mom)
            bn.running_var.mul_(1 - mom).add_(
                var_m.detach() * (n / (n - 1).clamp_min(1)), alpha=mom
            )
            bn.num_batches_tracked.add_(1)
    return (h_bm - mean_m) * torch.rsqrt(var_m + bn.eps) * bn.weight + bn.bias


def average_gradients(params: Sequence[Tensor], world: int) -> None:
    """Average gradients over DDP ranks (every rank holds grads for the same parameters)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for g in grads:
        g.copy_(flat[off : off + g.numel()].view_as(g))
        off += g.numel()


def reduce_metrics(parts: list[LossParts], world: int) -> list[LossParts]:
    """Per-backbone losses and R2 over the GLOBAL batch (a logged step only)."""
    out = []
    for p in parts:
        rec, aux, sums = torch.stack(p.rec_j), torch.stack(p.aux_j), torch.stack(p.r2_j)
        if world > 1:
            for t in (rec, aux, sums):
                dist.all_reduce(t)
            rec, aux = rec / world, aux / world
        out.append(
            p._replace(rec_j=list(rec), aux_j=list(aux), r2_j=[r2_from_sums(x) for x in sums])
        )
    return out
