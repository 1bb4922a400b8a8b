"""What every `flexplugin` command shares: the device options (--device, --cpu-fallback, --threads, --gpus) and
their resolution, the settings-dataclass options, small option parsers, and `run`, which maps bad input to an
`error:` line and exit status 2 (3 for a full disk, 4 for a failed torchrun process) and joins torchrun.

The command modules of this package import this one and the engine, never each other."""
from __future__ import annotations

import argparse
import math
import os
import sys
import typing
from dataclasses import Field
from typing import Any

import numpy as np

from ..engine.options import cli_fields, help_text, option_name

__all__ = ["CPU_FALLBACK_ENV", "DISTRIBUTED_COMMANDS", "EXIT_DISTRIBUTED", "add_common", "add_config_options",
           "check_blank_map", "config_from_args", "device", "option_ints", "resolve_device", "run"]

CPU_FALLBACK_ENV = "FLEXPLUGIN_CPU_FALLBACK"  # "1": a missing GPU runs the job on the CPU (Scipion sets it)
# jobs that run data-parallel under torchrun (torch.distributed); the others refuse to run in several processes
DISTRIBUTED_COMMANDS = ("flex-train", "reconstruct", "3dva", "3dva-display", "flex-reconstruct")
EXIT_DISTRIBUTED = 4  # a process of a torchrun job failed


# ------------------------------------------------------------------------------------------------ device
def _gpu_listing(torch) -> str:
    n = torch.cuda.device_count()
    if n == 0:
        return "no GPU is visible"
    names = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(n))
    return f"this machine has {n} GPU{'s' if n > 1 else ''} ({names})"


def resolve_device(name: str, cpu_fallback: bool = False, log=None) -> str:
    """The torch device for --device: 'auto' picks CUDA when present; a GPU that is missing (no CUDA, or an id
    beyond the GPUs present) is an InputError naming the GPUs, or with `cpu_fallback` a WARNING and 'cpu'."""
    import torch

    from ..engine.errors import InputError
    name = name.strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise InputError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N ({e})") from None
        if dev.type != "cpu":  # mps, meta, xpu, ...: devices torch knows but flexplugin is not written or tested for
            raise InputError(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
        return str(dev)
    try:
        idx = int(name.split(":", 1)[1]) if ":" in name else 0
    except ValueError:
        raise InputError(f"--device {name!r}: the GPU id must be a number, e.g. cuda:0") from None
    if not torch.cuda.is_available():
        problem = (f"--device {name} asks for a GPU but CUDA is not available here ({_gpu_listing(torch)}; "
                   f"torch {torch.__version__})")
    elif idx >= torch.cuda.device_count() or idx < 0:
        problem = f"--device {name}: GPU {idx} does not exist ({_gpu_listing(torch)})"
    else:
        return f"cuda:{idx}"
    if cpu_fallback:
        (log or (lambda m: print(m, flush=True)))(  # stdout: in order with the progress lines of the log
            f"WARNING: {problem}; running on the CPU instead (--cpu-fallback). This is much slower.")
        return "cpu"
    raise InputError(f"{problem}. Use --device cpu, give an existing GPU id, or pass --cpu-fallback (environment "
                     f"{CPU_FALLBACK_ENV}=1; in Scipion: 'Fall back to the CPU') to run on the CPU when the GPU is "
                     "missing")


def device(name: str) -> torch.device:  # noqa: F821 (torch is imported lazily)
    """--device as a torch.device (run() has already resolved it, applying --cpu-fallback)."""
    import torch
    return torch.device(resolve_device(name))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def add_common(p: argparse.ArgumentParser) -> None:
    """The options of every job that runs torch: --device, --cpu-fallback, --threads and --gpus."""
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--cpu-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="when the GPU asked for is missing (no CUDA, or no such id), print a WARNING and run on the "
                        f"CPU instead of stopping (default: off, or on when {CPU_FALLBACK_ENV}=1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--gpus", default=None,
                   help="GPU ids, e.g. 0,1,2,3: one process per GPU, started through torchrun on this node (jobs that "
                        "run data-parallel; one id: the same as --device cuda:<id>). See docs/distributed.md")


# ------------------------------------------------------------------------- options from settings dataclasses
_OPTION_OF_DEST: dict[str, str] = {}  # options whose dest is not their name (add_config_options fills it)


def _value_type(cls: type, f: Field) -> type:
    """The number or text type of a field (`float | None` -> float), from the dataclass's resolved annotations."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def positive_float(s: str) -> float:
    """A number > 0 (argparse names the option in its error: 'argument --filter-res: must be > 0, got 0')."""
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def add_config_options(p: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per command-line field of settings dataclass `cls` to parser `p` (dest = the field name;
    a boolean defaulting to True is `--no-<name>`, one defaulting to False `--<name>`); see engine/options.py."""
    for f in cli_fields(cls):
        text = help_text(f).replace("%", "%%")  # argparse formats help with %
        if not isinstance(f.default, bool) and option_name(f) != "--" + f.name.replace("_", "-"):
            _OPTION_OF_DEST[f.name] = option_name(f)  # e.g. lam -> --lambda, for the messages of run()
        if isinstance(f.default, bool):
            p.add_argument(option_name(f), dest=f.name, action="store_false" if f.default else "store_true",
                           help=text)
        else:
            kind = positive_float if f.metadata.get("positive") else _value_type(cls, f)
            extra = {"required": True} if f.metadata.get("required") else {"default": f.default}
            p.add_argument(option_name(f), dest=f.name, type=kind, choices=f.metadata.get("choices"), help=text,
                           metavar=None if f.metadata.get("choices") else option_name(f)[2:].upper().replace("-", "_"),
                           **extra)


def config_from_args(cls: type, a: argparse.Namespace, **extra: Any) -> Any:
    """An instance of settings dataclass `cls` from parsed arguments (its command-line fields) and `extra`
    (its other fields, when not left at their defaults)."""
    return cls(**{f.name: getattr(a, f.name) for f in cli_fields(cls)}, **extra)


# ------------------------------------------------------------------------------------ shared input checks
def int_list(s: str | None) -> list[int] | None:
    """'1, 2;3' -> [1, 2, 3]; None or '' -> None (ValueError for a part that is not a whole number)."""
    return None if not s else [int(x) for x in s.replace(";", ",").split(",") if x.strip()]


def option_ints(value: str | None, option: str, example: str) -> list[int] | None:
    """A comma-separated list of integers given to `option`; anything else is an InputError showing `example`."""
    from ..engine.errors import InputError
    try:
        return int_list(value)
    except ValueError:
        raise InputError(f"{option} {value!r} must be comma-separated whole numbers, e.g. '{example}'") from None


def check_blank_map(vol: np.ndarray, path: str, option: str) -> None:
    """A map that is all one value (all zeros, say) holds no structure: refuse it before any work."""
    from ..engine.errors import InputError
    lo, hi = float(np.min(vol)), float(np.max(vol))
    if lo == hi:
        raise InputError(f"{option} {path} holds the same value ({lo:g}) in every voxel: no structure to work "
                         "on; give the consensus map (e.g. from a 3D refinement)")


def check_boxes(a: argparse.Namespace) -> None:
    """--crop and --train-box, when given, are positive pixel counts (the even/range checks come later)."""
    from ..engine.errors import InputError
    for opt, v in (("--crop", a.crop), ("--train-box", a.train_box)):
        if v is not None and v <= 0:
            raise InputError(f"{opt} must be an even number of pixels >= 16; got {v} (omit {opt} for the default)")


# ------------------------------------------------------------------------------------------------- run
def _check_finite(args: argparse.Namespace) -> None:
    """NaN or Inf given for any number option is meaningless everywhere: an InputError naming the option."""
    from ..engine.errors import InputError
    for dest, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):
            opt = _OPTION_OF_DEST.get(dest, "--" + dest.replace("_", "-"))
            raise InputError(f"{opt} must be a finite number, got {v}")


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; bad input → `error: …` and status 2, a full disk → status 3 (engine/errors.py)."""
    from ..engine import distributed
    from ..engine.errors import EXIT_DISK_FULL, EXIT_INPUT, DiskFullError, InputError
    finished = False
    try:
        _check_finite(args)
        if getattr(args, "threads", 0) < 0:
            raise InputError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
        if getattr(args, "seed", 0) < 0:
            raise InputError(f"--seed must be >= 0, got {args.seed}")
        if hasattr(args, "device"):
            fallback = args.cpu_fallback if args.cpu_fallback is not None else _env_flag(CPU_FALLBACK_ENV)
            from .. import launch
            if getattr(args, "gpus", None) is not None:  # several ids outside torchrun: start it (flexplugin/launch.py)
                code = launch.start_gpus(args, getattr(args, "argv", None) or sys.argv[1:], DISTRIBUTED_COMMANDS,
                                         fallback)
                if code is not None:
                    return code
            else:  # under torchrun: cuda/auto is the GPU of this process's LOCAL_RANK
                args.device = launch.rank_device(args.device, None)
            args.device = resolve_device(args.device, fallback)
        if getattr(args, "threads", 0):
            import torch
            torch.set_num_threads(args.threads)
        main_rank = _join_torchrun(args)
        if hasattr(args, "out") and not str(args.out or "").strip():
            raise InputError("--out is empty: give the output folder")
        if getattr(args, "out", None) and main_rank:  # under torchrun rank 0 alone locks and writes the folder
            from ..engine.outdir import output_folder
            with output_folder(args.out, args.command) as folder:
                args.func(args)
            if folder.deleted:
                print(f"{args.command}: removed {len(folder.deleted)} output(s) of the earlier run that this run "
                      f"replaced (e.g. {folder.deleted[0]})", flush=True)
        else:
            args.func(args)
        finished = True
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    except DiskFullError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL
    except RuntimeError as e:  # a collective failed: another process of the torchrun job died or hung
        if distributed.world() == 1:
            raise
        print(f"error: rank {distributed.rank()} of {distributed.world()}: another process of this torchrun job "
              f"failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the last checkpoint in --out is "
              "intact: rerun with --continue", file=sys.stderr, flush=True)
        return EXIT_DISTRIBUTED
    finally:
        distributed.shutdown(clean=finished)  # under torchrun: leave the group before exiting, after the others
    return 0


def _join_torchrun(args: argparse.Namespace) -> bool:
    """Join the torchrun job described in the environment, if any; True on the rank that writes outputs."""
    from ..engine import distributed
    from ..engine.errors import InputError
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    if args.command not in DISTRIBUTED_COMMANDS:
        raise InputError(f"{args.command} does not run in several processes yet (under torchrun, WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}); run it as one process. Data-parallel: "
                         + ", ".join(DISTRIBUTED_COMMANDS))
    distributed.init_from_env(getattr(args, "device", "cpu"))
    return distributed.is_main()
