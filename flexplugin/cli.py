"""`flexplugin` command line: one subcommand per job; parses arguments, calls the engine, prints progress.

Every option a Scipion protocol exposes is defined here once (with help and default); protocols build
argument lists for these subcommands and run them through Scipion's runJob.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

CPU_FALLBACK_ENV = "FLEXPLUGIN_CPU_FALLBACK"  # "1": a missing GPU runs the job on the CPU (Scipion sets it)


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

    from .engine.errors import InputError
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


def _device(name: str) -> torch.device:  # noqa: F821 (torch is imported lazily)
    """--device as a torch.device (main() has already resolved it, applying --cpu-fallback)."""
    import torch
    return torch.device(resolve_device(name))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--cpu-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="when the GPU asked for is missing (no CUDA, or no such id), print a WARNING and run on the "
                        f"CPU instead of stopping (default: off, or on when {CPU_FALLBACK_ENV}=1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--gpus", default=None,
                   help="GPU ids, e.g. 0,1,2,3: one process per GPU, started through torchrun on this node (jobs that "
                        "run data-parallel; one id: the same as --device cuda:<id>). See docs/distributed.md")


def cmd_simulate(a: argparse.Namespace) -> None:
    from .engine.simulate import SimConfig, simulate_dataset
    cfg = SimConfig(n=a.n, box=a.box, apix=a.apix, snr=a.snr, seed=a.seed, hinge_deg=a.hinge,
                    twist_deg=a.twist, stack_size=a.stack_size)
    simulate_dataset(cfg, a.out)


def cmd_reconstruct(a: argparse.Namespace) -> None:
    from .engine.atomic import save_plot, savetxt, write_json
    from .engine.errors import InputError
    from .engine.io import check_volume_matches, read_mask, read_particles, write_volume
    from .engine.reconstruct import reconstruct_particles
    from .plots import plot_fsc, plot_slices
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.pad < 1:
        raise InputError(f"--pad must be at least 1 (1: no oversampling, 2: the default), got {a.pad}")
    dev = _device(a.device)
    ps = read_particles(a.particles, apix=a.apix)
    ps.require(poses=True, ctf=not a.no_ctf)
    ps.check_stacks()
    mask = None
    if a.mask:
        mask, mapix = read_mask(a.mask)
        check_volume_matches("mask", mask.shape, mapix, ps.box, ps.apix)
    from .engine import distributed
    world = distributed.world()  # under torchrun every rank inserts its share; rank 0 alone writes
    out = Path(a.out)
    distributed.say(f"reconstruct: {len(ps)} particles, box {ps.box}, {ps.apix:.4f} Å/px, device {dev}"
                    + (f", {world} processes (about {-(-len(ps) // world)} particles each)" if world > 1 else ""))
    if a.no_ctf:
        ps.table = ps.table.drop(columns=["rlnDefocusU", "rlnDefocusV"])
    t0 = time.time()
    r = reconstruct_particles(ps, batch_size=a.batch_size, pad=a.pad, device=str(dev), seed=a.seed, mask=mask)
    if not distributed.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, v in (("map.mrc", r.full), ("half1.mrc", r.half1), ("half2.mrc", r.half2)):
        write_volume(out / name, v, ps.apix)
    freq = np.arange(len(r.fsc)) / (ps.box * ps.apix)
    savetxt(out / "fsc.txt", np.stack([freq, r.fsc], 1), header="frequency_1/A fsc_half_maps", fmt="%.6f")
    save_plot(plot_fsc, out / "fsc.png", {"half maps" + (" (masked)" if mask is not None else ""): r.fsc}, ps.apix)
    save_plot(plot_slices, out / "map_slices.png", {"map": r.full})
    summary = {"particles": len(ps), "half_counts": list(r.counts), "apix": ps.apix, "box": ps.box,
               "resolution_0143_A": r.res_0143, "resolution_05_A": r.res_05, "seconds": time.time() - t0,
               "world_size": world, "particles_per_rank": -(-len(ps) // world)}
    write_json(out / "reconstruct.json", summary)
    from .engine.resolution import write_resolution_outputs  # as flex-reconstruct: docs/resolution.md
    from .plots_flex import plot_masked_fsc
    res = write_resolution_outputs(out, {"map": (r.half1, r.half2)}, mask, ps.apix, gain=None,
                                   plot_fsc=plot_masked_fsc, device=dev)["fsc"]["map"]
    print(f"reconstruct: resolution {r.res_0143:.2f} Å (FSC 0.143), {r.res_05:.2f} Å (FSC 0.5); "
          + (f"masked FSC corrected by phase randomisation {res['resolution_A']:.2f} Å; " if mask is not None else "")
          + f"local resolution in locres_map.mrc; outputs in {out}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flexplugin", description=__doc__.splitlines()[0])
    from . import __version__
    p.add_argument("--version", action="version", version=f"flexplugin {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="write the built-in flexible example data set")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
    s.add_argument("--box", type=int, default=64, help="box size in pixels, even (default 64)")
    s.add_argument("--apix", type=float, default=2.0, help="pixel size in Å (default 2.0)")
    s.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio, variance ratio (default 0.1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--hinge", type=float, default=25.0, help="hinge amplitude in degrees at |t|=1 (default 25)")
    s.add_argument("--twist", type=float, default=30.0, help="head twist in degrees at |t|=1 (default 30)")
    s.add_argument("--stack-size", type=int, default=1000, help="images per .mrcs stack (default 1000)")
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("reconstruct", help="Wiener backprojection: map, half maps and FSC")
    r.add_argument("--particles", required=True, help="RELION STAR file with poses and CTF")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--mask", help="optional mask for the FSC (MRC, same box and pixel size)")
    r.add_argument("--apix", type=float, help="pixel size in Å (only for RELION 3.0 files without it)")
    r.add_argument("--pad", type=int, default=2, help="oversampling factor of the 3-D grid (default 2)")
    r.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    r.add_argument("--seed", type=int, default=0, help="seed of the half-set split when rlnRandomSubset is absent")
    r.add_argument("--no-ctf", action="store_true", help="ignore the CTF (for CTF-free test data)")
    _add_common(r)
    r.set_defaults(func=cmd_reconstruct)

    from . import cli_flex, cli_va3d
    cli_va3d.register(sub)
    cli_flex.register(sub)
    return p


_OPTION_OF_DEST = {"lam": "--lambda"}  # options whose dest is not their name


def _check_finite(args: argparse.Namespace) -> None:
    """NaN or Inf given for any number option is meaningless everywhere: an InputError naming the option."""
    import math

    from .engine.errors import InputError
    for dest, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):
            opt = _OPTION_OF_DEST.get(dest, "--" + dest.replace("_", "-"))
            raise InputError(f"{opt} must be a finite number, got {v}")


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; bad input → `error: …` and status 2, a full disk → status 3 (see engine.errors)."""
    from .engine.errors import EXIT_DISK_FULL, EXIT_INPUT, DiskFullError, InputError
    try:
        _check_finite(args)
        if getattr(args, "threads", 0) < 0:
            raise InputError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
        if getattr(args, "seed", 0) < 0:
            raise InputError(f"--seed must be >= 0, got {args.seed}")
        if hasattr(args, "device"):
            fallback = args.cpu_fallback if args.cpu_fallback is not None else _env_flag(CPU_FALLBACK_ENV)
            from . import launch
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
            from .engine.outdir import output_folder
            with output_folder(args.out, args.command) as folder:
                args.func(args)
            if folder.deleted:
                print(f"{args.command}: removed {len(folder.deleted)} output(s) of the earlier run that this run "
                      f"replaced (e.g. {folder.deleted[0]})", flush=True)
        else:
            args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    except DiskFullError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL
    except RuntimeError as e:  # a collective failed: another process of the torchrun job died or hung
        from .engine import distributed
        if distributed.world() == 1:
            raise
        print(f"error: rank {distributed.rank()} of {distributed.world()}: another process of this torchrun job "
              f"failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the last checkpoint in --out is "
              "intact: rerun with --continue", file=sys.stderr, flush=True)
        return EXIT_DISTRIBUTED
    return 0


# jobs that run data-parallel under torchrun (torch.distributed); the others refuse to run in several processes
DISTRIBUTED_COMMANDS = ("flex-train", "reconstruct", "3dva", "3dva-display", "flex-reconstruct")
EXIT_DISTRIBUTED = 4  # a process of a torchrun job failed


def _join_torchrun(args: argparse.Namespace) -> bool:
    """Join the torchrun job described in the environment, if any; True on the rank that writes outputs."""
    from .engine import distributed
    from .engine.errors import InputError
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    if args.command not in DISTRIBUTED_COMMANDS:
        raise InputError(f"{args.command} does not run in several processes yet (under torchrun, WORLD_SIZE="
                         f"{os.environ['WORLD_SIZE']}); run it as one process. Data-parallel: "
                         + ", ".join(DISTRIBUTED_COMMANDS))
    distributed.init_from_env(getattr(args, "device", "cpu"))
    return distributed.is_main()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # --gpus with several ids passes them on to torchrun
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
