"""The few collectives the data path needs, usable without a process group (tests, scripts): then they are no-ops.

torch is only imported when the caller already has: a tokenizer worker process never pays for it."""
from __future__ import annotations

import os
import sys
from typing import Optional, Tuple


def _group(world_size: int):
    dist = sys.modules.get("torch.distributed")
    if (world_size == 1 or dist is None or not dist.is_available() or not dist.is_initialized()
            or dist.get_world_size() != world_size):
        return None
    return dist


def resolve_world(world_size: Optional[int], rank: Optional[int]) -> Tuple[int, int]:
    if world_size is None or rank is None:
        # Only look at torch.distributed if the caller already imported it: a process that never imported torch
        # cannot have a process group, and importing torch here would cost a second for nothing.
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            default_ws, default_rank = dist.get_world_size(), dist.get_rank()
        else:
            default_ws = int(os.environ.get("WORLD_SIZE", "1"))
            default_rank = int(os.environ.get("RANK", "0"))
        world_size = default_ws if world_size is None else world_size
        rank = default_rank if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not valid for world_size {world_size} (need 0 <= rank < world_size)")
    return int(world_size), int(rank)


def _reduce(values, world_size: int, op: str):
    dist = _group(world_size)
    if dist is None:
        return list(values)
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return [int(v) for v in t.tolist()]


def sync_steps(steps: int, world_size: int) -> Tuple[int, int]:
    """(min, max) of `steps` over the ranks when a process group is up, else (steps, steps)."""
    low, neg_high = _reduce([steps, -steps], world_size, "MIN")
    return low, -neg_high


def agree(error: Optional[BaseException], world_size: int, where: str) -> None:
    """Every rank learns whether any rank failed at `where` (common.all_ranks_ok, which quotes the failing rank's
    error on every rank); without a process group of `world_size` ranks only this rank's error counts."""
    if _group(world_size) is None:
        if error is not None:
            raise error
        return
    from common import all_ranks_ok

    all_ranks_ok(error, where)


def barrier(world_size: int) -> None:
    dist = _group(world_size)
    if dist is not None:
        _reduce([0], world_size, "SUM")  # an all_reduce, not dist.barrier(): gloo and nccl both honour its timeout
