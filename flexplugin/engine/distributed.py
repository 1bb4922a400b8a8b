"""Data parallelism on torch.distributed: rank and world, rendezvous from torchrun's environment, sums.

One process is the default and needs nothing: every helper here is then a no-op (world 1, rank 0). Under
`torchrun --nproc-per-node N` (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) `init_from_env`
joins the group, gloo on CPUs and NCCL on GPUs; jobs then split their particles by rank and add their partial
sums with `all_reduce_`, so every rank ends a step with the same numbers as one process would.
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "init_from_env", "is_main", "rank", "shard", "world"]


def world() -> int:
    """Number of processes in the group (1 when torch.distributed is not in use)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not in use)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes outputs and prints progress (rank 0)."""
    return rank() == 0


def init_from_env(device: torch.device | str = "cpu", timeout_s: float = 600.0) -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); False in one process.

    The backend follows the device: NCCL for CUDA, gloo otherwise. A rank that dies makes the others' next
    collective fail (gloo: at once, as its sockets close; NCCL: after `timeout_s`), so no rank hangs forever.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's share of `rows`: every world-th one from its rank on (balanced to one row, order kept)."""
    return rows[rank()::world()]


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a no-op in one process); returns it."""
    if world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
