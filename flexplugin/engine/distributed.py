"""Data parallelism on torch.distributed: rank and world, rendezvous from torchrun's environment, sums.

One process is the default and needs nothing: every helper here is then a no-op (world 1, rank 0). Under
`torchrun --nproc-per-node N` (env:// rendezvous: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) `init_from_env`
joins the group, gloo on CPUs and NCCL on GPUs; jobs then split their particles by rank and add their partial
sums with `all_reduce_`, so every rank ends a step with the same numbers as one process would.
"""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "all_reduce_flat_", "bytes_reduced", "init_from_env", "is_main", "merge_rows_", "rank", "reduce_seconds",
           "say", "shard", "world"]

EXIT_STOPPED = 128 + signal.SIGTERM  # a process stopped by SIGTERM (the shell's convention), after its error line
_TRAFFIC = {"bytes": 0, "seconds": 0.0}  # payload of this process's all-reduces, and the time spent in them


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
    if dev.type == "cuda":  # this rank's GPU (flexplugin/launch.py: --gpus ids[LOCAL_RANK], else LOCAL_RANK)
        torch.cuda.set_device(dev if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    signal.signal(signal.SIGTERM, _stopped)
    return True


def shutdown(clean: bool = True) -> None:
    """Leave the process group before the interpreter exits (no-op in one process). A group left to interpreter
    shutdown can abort its process (gloo: "terminate called without an active exception") while another rank still
    works. `clean`: this rank finished normally, so it first waits for the others; a failing rank leaves at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        try:
            dist.barrier()
        except RuntimeError:  # another rank died meanwhile: nothing left to wait for
            pass
    dist.destroy_process_group()


def _stopped(signum: int, frame) -> None:
    """SIGTERM in a torchrun job (torchrun stops the others when a process fails): an error line naming this
    rank, then a normal exit, so that context managers release the output folder and unfinished files."""
    print(f"error: rank {rank()} of {world()} was stopped (SIGTERM from torchrun: another process of this job "
          "failed, or the job was cancelled); a failed run writes no outputs; jobs with checkpoints continue "
          "with --continue", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_STOPPED)


def shard(rows: np.ndarray) -> np.ndarray:
    """This rank's share of `rows`: every world-th one from its rank on (balanced to one row, order kept)."""
    return rows[rank()::world()]


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (a no-op in one process); returns it. Complex tensors are summed as
    their real and imaginary parts (gloo has no complex sum); the payload is counted in `bytes_reduced`."""
    if world() > 1:
        flat = torch.view_as_real(t) if t.is_complex() else t
        t0 = time.perf_counter()
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _TRAFFIC["seconds"] += time.perf_counter() - t0
        _TRAFFIC["bytes"] += t.numel() * t.element_size()
    return t


def all_reduce_flat_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum several real tensors of one dtype and device over the ranks in one collective (packed into one flat
    buffer, then copied back), in place: one exchange instead of one per tensor (e.g. all gradients of a step)."""
    if world() > 1 and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        all_reduce_(flat)
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
    return tensors


def merge_rows_(t: torch.Tensor, rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Every rank gets every row of the per-particle table `t` from the rank that computed it: `rows` are this
    rank's rows (each row belongs to exactly one rank), the others are zeroed and the tables summed, in place."""
    if world() > 1:
        keep = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
        keep[torch.as_tensor(np.asarray(rows), dtype=torch.long, device=t.device)] = True
        t.copy_(all_reduce_(torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))))
    return t


def bytes_reduced(reset: bool = False) -> int:
    """Bytes this process has summed over the ranks so far (0 in one process); `reset` starts the count again."""
    n = int(_TRAFFIC["bytes"])
    if reset:
        _TRAFFIC["bytes"] = 0
    return n


def reduce_seconds(reset: bool = False) -> float:
    """Seconds this process has spent in all-reduces (waiting for the slowest rank included); `reset` restarts."""
    s = _TRAFFIC["seconds"]
    if reset:
        _TRAFFIC["seconds"] = 0.0
    return s


def say(*args, **kwargs) -> None:
    """print() on rank 0 only (flushed): progress lines appear once, with the global counts."""
    if is_main():
        print(*args, **{"flush": True, **kwargs})
