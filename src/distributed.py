"""Distributed-training helpers for src/train.py: process-group setup from torchrun's environment,
an all-gather that carries gradients (also on gloo), and a DistributedSampler that can start mid-epoch.

One process per device. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
without them (plain `python src/train.py`) everything here is a no-op with world size 1.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from errors import ConfigError
from utils import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str | None, timeout_minutes: float = 60.0) -> tuple[DistInfo, torch.device]:
    """Reads torchrun's environment, joins (or creates) the process group and picks this process's device.

    CUDA processes use NCCL and `cuda:LOCAL_RANK` (unless --device names an index); CPU processes use gloo.
    The long timeout lets the other ranks wait while rank 0 alone runs validation.
    """
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():  # a caller set the group up already
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    else:
        world = int(os.environ.get("WORLD_SIZE", 1))
        info = DistInfo(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)), False)
        if world > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ConfigError(f"WORLD_SIZE={world} but {missing} are not set; launch with torchrun")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        info.owns_group = True
    return info, device


def cleanup_distributed(info: DistInfo, ok: bool) -> None:
    """Barrier (only after a clean run: a failed rank would leave the others waiting), then destroy."""
    if info.owns_group and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in the forward; in the backward, the sum over ranks of the incoming gradient, sliced.

    Every rank computes the same global loss from the gathered rows, so each rank's incoming gradient
    is the full dL/d(all rows). Summing it over ranks gives N x dL/d(this rank's rows); DDP then
    averages the parameter gradients over the N ranks, which cancels the N: the update equals the
    single-process gradient of the global batch (tests/test_train.py compares Adam's moments).
    Implemented with all_gather + all_reduce only, which gloo supports (torch.distributed.nn's
    version needs reduce_scatter).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows: (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on each of N ranks -> [N*b, ...] (rank order), differentiable. Every rank needs the same b."""
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / info.world_size


def all_gather_object(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start after its first `start` indices.

    The order of an epoch depends only on (seed, epoch), so a resumed run rebuilds it and drops the
    indices already trained on, without loading their images. After k steps of per-rank batch b on
    N ranks, the samples consumed are exactly the first k*b*N of the epoch's permutation, whatever N
    (rank r takes positions r, r+N, ...), so `start = samples_done // N` also works across a change of
    world size.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)
