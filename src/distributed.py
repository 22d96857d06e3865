"""Distributed-training helpers for src/train.py: the process layout from torchrun's or SLURM's
environment, the device of each process, an all-gather that carries gradients (also on gloo), errors
that reach every rank, and a DistributedSampler that can start mid-epoch.

One process per device. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK,
MASTER_ADDR and MASTER_PORT; `srun` without torchrun sets SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID and
SLURM_STEP_NUM_TASKS, and the job script exports MASTER_ADDR/MASTER_PORT (README, multi-node). Without
either (plain `python src/train.py`) everything here is a no-op with world size 1.
"""
from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from errors import ConfigError, DeviceError, UserError
from utils import resolve_device


class RankFailed(UserError):
    """Another process of the run failed; its own output says why."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when init_distributed created the process group (and must destroy it)
    local_world_size: int = 1  # processes on this node
    node_rank: int = 0  # this node's number (0 .. nodes - 1)
    launcher: str = "none"  # "torchrun", "slurm" or "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def multi_node(self) -> bool:
        return self.world_size > self.local_world_size


def _slurm_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compact tasks-per-node list ("4(x2),3" -> [4, 4, 3])."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not in SLURM's format")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def layout_from_env(env=None) -> DistInfo:
    """The process layout the launcher describes: torchrun's variables first, else those `srun` gives each
    task (used only inside an srun step of more than one task, so a job script's own shell, which also
    sees SLURM_* variables, stays a single process)."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return DistInfo(int(env.get("RANK", 0)), world, int(env.get("LOCAL_RANK", 0)),
                        local_world_size=local_world, node_rank=int(env.get("GROUP_RANK", 0)),
                        launcher="torchrun" if world > 1 else "none")
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", 1))
    if tasks > 1 and "SLURM_PROCID" in env:
        node = int(env.get("SLURM_NODEID", 0))
        per_node = _slurm_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(tasks)))
        local_world = per_node[node] if node < len(per_node) else per_node[-1]
        return DistInfo(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", 0)),
                        local_world_size=local_world, node_rank=node, launcher="slurm")
    return DistInfo()


def pick_device(requested: torch.device, info: DistInfo, visible: int) -> torch.device:
    """This process's device. One process: the device asked for (`cuda` = the current CUDA device). Several:
    `cuda:LOCAL_RANK`, or `cuda:0` where the launcher shows each process only its own GPU; an index in
    --device would put every rank on one GPU, so it is refused."""
    if requested.type != "cuda":
        return requested
    if not info.enabled:
        return requested if requested.index is not None else torch.device("cuda", torch.cuda.current_device())
    if requested.index is not None:
        raise ConfigError(f"--device {requested}: with {info.world_size} processes each one takes cuda:LOCAL_RANK; "
                          "pass --device cuda (or none) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if visible == 1:
        return torch.device("cuda", 0)
    if info.local_rank < visible:
        return torch.device("cuda", info.local_rank)
    raise DeviceError(f"process {info.rank} has LOCAL_RANK {info.local_rank} but sees {visible} GPU(s) "
                      f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); show each "
                      "process all of its node's GPUs, or exactly one")


def init_distributed(device_name: str | None, timeout_minutes: float = 60.0) -> tuple[DistInfo, torch.device]:
    """Reads the launcher's environment, joins (or creates) the process group and picks this process's device.

    CUDA processes use NCCL, CPU processes gloo. The long timeout lets the other ranks wait while rank 0
    alone runs validation.
    """
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():  # a caller set the group up already
        info = layout_from_env()
        info.rank, info.world_size, info.owns_group = dist.get_rank(), dist.get_world_size(), False
    else:
        info = layout_from_env()
        if info.enabled:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise ConfigError(f"WORLD_SIZE={info.world_size} but {missing} are not set; launch with torchrun, or "
                                  "export them in the job script (README, multi-node)")
    if device.type == "cuda":
        device = pick_device(device, info, torch.cuda.device_count())
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
        info.owns_group = True
    return info, device


def cleanup_distributed(info: DistInfo, ok: bool) -> None:
    """Barrier (only after a clean run: a failed rank would leave the others waiting), then destroy."""
    if info.owns_group and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def agree(info: DistInfo, error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed `what` (collective: every rank calls it at the same
    point, failed or not). A failed rank re-raises its own error, the others raise RankFailed naming the
    first failed rank, so no rank is left waiting in a collective for a process that stopped."""
    if info.enabled:
        gathered = all_gather_object(None if error is None else f"{type(error).__name__}: {error}", info)
        failed = [(r, text) for r, text in enumerate(gathered) if text is not None]
        if failed and error is None:
            rank, text = failed[0]
            raise RankFailed(f"rank {rank} failed while {what} ({text.splitlines()[0][:300]}); its output has the details")
    if error is not None:
        raise error


def every_rank(info: DistInfo, fn, what: str):
    """`fn()` on every rank, then `agree` on whether it failed anywhere; returns this rank's result."""
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - reported to every rank, then re-raised
        agree(info, e, what)
        raise
    agree(info, None, what)
    return result


def main_only(info: DistInfo, fn, what: str):
    """`fn()` on rank 0 alone; every rank learns whether it failed (collective, `agree`)."""
    result = error = None
    if info.is_main:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - reported to every rank, then re-raised
            error = e
    agree(info, error, what)
    return result


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
