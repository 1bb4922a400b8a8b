"""Several GPUs for one job: `--gpus`, the device of each torchrun rank, and torchrun started by flexplugin itself.

`flexplugin <job> --gpus 0,1,2,3` (ids as torch numbers the visible GPUs, i.e. after CUDA_VISIBLE_DEVICES)
starts PyTorch's own launcher, torch.distributed.run, on this node with one process per id; each process then
runs the job data-parallel (engine/distributed.py) on the GPU `ids[LOCAL_RANK]`. The same `--gpus` list given
to a job that torchrun already started (Scipion's command lines, SLURM scripts) picks each rank's GPU the same
way. One id is simply `--device cuda:<id>`. Without a GPU the job stops with an error naming what is missing,
or, with --cpu-fallback, runs the same number of processes on the CPU (gloo) after a WARNING. docs/distributed.md
describes every way to launch.
"""
from __future__ import annotations

import os
import re
import signal
import sys

__all__ = ["TORCHRUN_MODULE", "gpu_ids", "launch_torchrun", "rank_device", "start_gpus", "torchrun_args",
           "without_option"]

TORCHRUN_MODULE = "torch.distributed.run"  # what `torchrun` runs


def gpu_ids(spec: str) -> list[int]:
    """'0,1,2' or '0 1 2' (Scipion's %(GPU)s) → [0, 1, 2]; an InputError names a bad, negative or repeated id."""
    from .engine.errors import InputError
    words = [w for w in re.split(r"[,\s]+", str(spec).strip()) if w]
    if not words:
        raise InputError("--gpus is empty: give GPU ids such as 0,1,2,3")
    try:
        ids = [int(w) for w in words]
    except ValueError:
        raise InputError(f"--gpus {spec!r}: GPU ids are whole numbers separated by commas, e.g. 0,1,2,3") from None
    if min(ids) < 0:
        raise InputError(f"--gpus {spec!r}: GPU ids start at 0")
    if len(set(ids)) != len(ids):
        raise InputError(f"--gpus {spec!r} names a GPU twice: one process per GPU")
    return ids


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str, gpus: list[int] | None) -> str:
    """The --device of this process: under torchrun `cuda:<gpus[LOCAL_RANK]>` with --gpus, or
    `cuda:<LOCAL_RANK>` for --device cuda/auto on a machine with GPUs; otherwise `device` unchanged."""
    from .engine.errors import InputError
    if _world() <= 1:
        return f"cuda:{gpus[0]}" if gpus else device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if gpus:
        nlocal = int(os.environ.get("LOCAL_WORLD_SIZE", str(len(gpus))))
        if nlocal != len(gpus):
            raise InputError(f"--gpus gives {len(gpus)} GPU ids but torchrun started {nlocal} processes on this node: "
                             "give one id per process (--nproc-per-node)")
        return f"cuda:{gpus[local]}"
    if device in ("cuda", "auto"):
        import torch
        if torch.cuda.is_available():
            return f"cuda:{local % torch.cuda.device_count()}"
    return device


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (the first word is the subcommand; values are kept)."""
    out, skip = [], False
    for w in argv:
        if skip:
            skip = False
        elif w == option:
            skip = True
        elif not w.startswith(option + "="):
            out.append(w)
    return out


def torchrun_args(nproc: int, job_argv: list[str], module: str = "flexplugin") -> list[str]:
    """torch.distributed.run's arguments for `nproc` processes of `python -m module <job_argv>` on this node.

    '--' ends torchrun's own options: its parser would otherwise take a job option such as 3dva-display's --run
    for an abbreviation of its --run-path."""
    return ["--standalone", f"--nproc-per-node={nproc}", "-m", module, "--", *job_argv]


def launch_torchrun(nproc: int, job_argv: list[str]) -> int:
    """Run `flexplugin <job_argv>` in `nproc` processes under torch.distributed.run (in this process, so that
    a signal to it reaches every worker); returns the job's exit status: 0, a rank's 2 (bad input) or 3 (disk
    full), else 4 after an `error:` line naming the failed ranks."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(torchrun_args(nproc, job_argv))
    try:
        run(args)
    except ChildFailedError as e:
        codes = {r: f.exitcode for r, f in sorted(e.failures.items())}
        own = [c for c in codes.values() if c not in (-signal.SIGTERM, 128 + signal.SIGTERM)]  # the ones torchrun
        # stopped with SIGTERM after the first failure (engine/distributed.py exits 128 + SIGTERM on it)
        for code in (2, 3):  # the failed ranks printed the error line; keep it the last one in the log
            if own and all(c == code for c in own):
                return code
        which = ", ".join(f"rank {r} exit code {c}" + (f" (signal {-c})" if c < 0 else "") for r, c in codes.items())
        print(f"error: {job_argv[0]} in {nproc} processes failed: {which}; outputs of a failed run are not written "
              "(jobs with checkpoints continue with --continue)", file=sys.stderr, flush=True)
        return 4
    return 0


def start_gpus(args, argv: list[str], distributed_commands: tuple[str, ...], cpu_fallback: bool) -> int | None:
    """Apply `--gpus` to the parsed `args`: set args.device for this process and return None, or, for several ids
    outside torchrun, run the job under torchrun and return its exit status."""
    from .engine.errors import InputError
    ids = gpu_ids(args.gpus)
    if str(args.device).strip() != "auto":
        raise InputError(f"give either --gpus or --device, not both (--device {args.device}, --gpus {args.gpus})")
    if _world() > 1 or len(ids) == 1:
        args.device = rank_device("auto", ids)
        return None
    if args.command not in distributed_commands:
        raise InputError(f"{args.command} runs on one GPU: give a single id to --gpus (several GPUs: "
                         + ", ".join(distributed_commands) + ")")
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    child = list(argv)
    if n == 0 or max(ids) >= n:
        have = "no GPU is visible" if n == 0 else f"this machine shows {n} GPU{'s' if n > 1 else ''} (ids 0-{n - 1})"
        problem = f"--gpus {args.gpus} asks for {len(ids)} GPUs but {have}"
        if not cpu_fallback:
            raise InputError(f"{problem}. Give ids of GPUs present, or pass --cpu-fallback to run {len(ids)} "
                             "processes on the CPU instead")
        print(f"WARNING: {problem}; running {len(ids)} processes on the CPU instead (--cpu-fallback). This is much "
              "slower.", flush=True)
        child = without_option(child, "--gpus") + ["--device", "cpu"]
    return launch_torchrun(len(ids), child)
