"""Data-parallel meta-training on PyTorch's own engine (torch.distributed; launched by torchrun).

Each rank takes the episodes b = rank, rank + P, ... of every meta-batch (the same episodes a
single process would draw), computes their meta-gradients scaled by 1/meta_batch, and the ranks
sum them with one all-reduce: the result is the single-process mean. Every rank validates its share
of the validation episodes (`gather_scores`), so none waits alone; rank 0 alone logs and checkpoints.
At the end of each iteration the ranks agree on whether a signal asked them to stop (`agree_stop`).
gloo on CPU, nccl on CUDA. A rank that dies makes the others fail with a clear error within
`timeout` seconds instead of hanging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .algorithms.base import StepStats


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, meta_batch: int) -> range:
        """This rank's episode indices within a meta-batch."""
        return range(self.rank, meta_batch, self.world)


class RankFailure(RuntimeError):
    """Another rank stopped answering (died or timed out)."""


def from_environment() -> DistContext:
    """The context torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (single process otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    return DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(ctx: DistContext, device: torch.device, timeout: float) -> None:
    if ctx.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))


def shutdown(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_step(ctx: DistContext, params: list[torch.nn.Parameter], stats: StepStats, tasks: int,
                    device: torch.device) -> StepStats:
    """Sum the gradients (already scaled by 1/meta_batch) and task-weighted statistics over ranks."""
    if not ctx.active:
        return stats
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    keys = sorted(stats.extra)
    acc = stats.accuracy if stats.accuracy is not None else 0.0
    summary = torch.tensor([tasks, tasks * stats.loss, tasks * acc] + [tasks * stats.extra[k] for k in keys],
                           dtype=torch.float64, device=device)
    flat = torch.cat([g.reshape(-1) for g in grads])
    try:
        dist.all_reduce(flat)
        dist.all_reduce(summary)
    except RuntimeError as e:
        raise RankFailure(f"rank {ctx.rank}: another rank stopped answering ({str(e).splitlines()[0]})") from None
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i : i + g.numel()].view_as(g).clone()
        i += g.numel()
    n = float(summary[0])
    values = (summary[1:] / n).tolist()
    return StepStats(values[0], values[1] if stats.accuracy is not None else None, dict(zip(keys, values[2:])))


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        try:
            dist.barrier()
        except RuntimeError as e:
            raise RankFailure(f"rank {ctx.rank}: another rank stopped answering ({str(e).splitlines()[0]})") from None


def _reduce(ctx: DistContext, t: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    try:
        dist.all_reduce(t, op=op)
    except RuntimeError as e:
        raise RankFailure(f"rank {ctx.rank}: another rank stopped answering ({str(e).splitlines()[0]})") from None
    return t


def gather_scores(ctx: DistContext, total: int, indices: range, losses: list[float], accs: list[float],
                  device: torch.device) -> tuple[list[float], list[float]]:
    """Per-episode scores of all ranks in episode order (each rank scored `indices` of `range(total)`).

    Summing float64 rows that are zero except at each rank's own episodes is exact: the result equals
    what one process scoring every episode computes.
    """
    if not ctx.active:
        return losses, accs
    rows = torch.zeros(3, total, dtype=torch.float64, device=device)
    idx = torch.tensor(list(indices), dtype=torch.long, device=device)
    rows[0, idx] = torch.tensor(losses, dtype=torch.float64, device=device)
    if accs:
        rows[1, idx] = torch.tensor(accs, dtype=torch.float64, device=device)
        rows[2, idx] = 1.0
    _reduce(ctx, rows)
    has_acc = bool(rows[2].sum() == total)
    return rows[0].tolist(), rows[1].tolist() if has_acc else []


def agree_stop(ctx: DistContext, signum: int | None, device: torch.device) -> int | None:
    """The signal any rank received (largest number), so all ranks stop after the same iteration."""
    if not ctx.active:
        return signum
    flag = _reduce(ctx, torch.tensor([signum or 0], dtype=torch.int64, device=device), dist.ReduceOp.MAX)
    return int(flag[0]) or None
