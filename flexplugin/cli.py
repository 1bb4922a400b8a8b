"""`flexplugin` command line: one subcommand per job; parses arguments, calls the engine, prints progress.

Every option a Scipion protocol exposes is defined here once (with help and default); protocols build
argument lists for these subcommands and run them through Scipion's runJob.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _device(name: str) -> "torch.device":  # noqa: F821
    """Resolve --device: 'auto' picks CUDA when present; a missing GPU id is a clear error."""
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name} asked for a GPU but CUDA is not available here; "
                             "use --device cpu")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise SystemExit(f"error: GPU {idx} does not exist (this machine has {torch.cuda.device_count()})")
    return torch.device(name)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")


def cmd_simulate(a: argparse.Namespace) -> None:
    from .engine.simulate import SimConfig, simulate_dataset
    cfg = SimConfig(n=a.n, box=a.box, apix=a.apix, snr=a.snr, seed=a.seed, hinge_deg=a.hinge,
                    twist_deg=a.twist, stack_size=a.stack_size)
    simulate_dataset(cfg, a.out)


def cmd_reconstruct(a: argparse.Namespace) -> None:
    import torch
    from .engine.io import read_mask, read_particles, write_volume, check_volume_matches
    from .engine.reconstruct import reconstruct_particles
    from .plots import plot_fsc, plot_slices
    dev = _device(a.device)
    ps = read_particles(a.particles, apix=a.apix)
    ps.require(poses=True, ctf=not a.no_ctf)
    ps.check_stacks()
    mask = None
    if a.mask:
        mask, mapix = read_mask(a.mask)
        check_volume_matches("mask", mask.shape, mapix, ps.box, ps.apix)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"reconstruct: {len(ps)} particles, box {ps.box}, {ps.apix:.4f} Å/px, device {dev}", flush=True)
    if a.no_ctf:
        ps.table = ps.table.drop(columns=["rlnDefocusU", "rlnDefocusV"])
    t0 = time.time()
    r = reconstruct_particles(ps, batch_size=a.batch_size, pad=a.pad, device=str(dev), seed=a.seed, mask=mask)
    for name, v in (("map.mrc", r.full), ("half1.mrc", r.half1), ("half2.mrc", r.half2)):
        write_volume(out / name, v, ps.apix)
    freq = np.arange(len(r.fsc)) / (ps.box * ps.apix)
    np.savetxt(out / "fsc.txt", np.stack([freq, r.fsc], 1), header="frequency_1/A fsc_half_maps", fmt="%.6f")
    plot_fsc({"half maps" + (" (masked)" if mask is not None else ""): r.fsc}, ps.apix, out / "fsc.png")
    plot_slices({"map": r.full}, out / "map_slices.png")
    summary = {"particles": len(ps), "half_counts": list(r.counts), "apix": ps.apix, "box": ps.box,
               "resolution_0143_A": r.res_0143, "resolution_05_A": r.res_05, "seconds": time.time() - t0}
    (out / "reconstruct.json").write_text(json.dumps(summary, indent=2))
    print(f"reconstruct: resolution {r.res_0143:.2f} Å (FSC 0.143), {r.res_05:.2f} Å (FSC 0.5); "
          f"outputs in {out}", flush=True)


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


def main(argv: list[str] | None = None) -> int:
    from .engine.errors import InputError
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", 0):
        import torch
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
