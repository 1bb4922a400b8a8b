"""`flexplugin reconstruct`: Wiener backprojection of particles with poses: map, half maps, FSC, local resolution."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import add_common, add_config_options, device

COMMAND = "reconstruct"
HELP = "Wiener backprojection: map, half maps and FSC"


def add_args(p: argparse.ArgumentParser) -> None:
    """The particles, mask and output folder, WienerConfig's options (oversampling, batch size, half-set seed)."""
    from ..engine.wiener_config import WienerConfig
    p.add_argument("--particles", required=True, help="RELION STAR file with poses and CTF")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mask", help="optional mask for the FSC (MRC, same box and pixel size)")
    p.add_argument("--apix", type=float, help="pixel size in Å (only for RELION 3.0 files without it)")
    add_config_options(p, WienerConfig)  # --pad, --batch-size, --seed: declared once, in WienerConfig
    p.add_argument("--no-ctf", action="store_true", help="ignore the CTF (for CTF-free test data)")
    add_common(p)


def main(a: argparse.Namespace) -> None:
    """Reconstruct the particles of --particles into --out (under torchrun every rank inserts its share)."""
    from ..engine import distributed
    from ..engine.atomic import save_plot, savetxt, write_json
    from ..engine.errors import InputError
    from ..engine.io import check_volume_matches, read_mask, read_particles, write_volume
    from ..engine.plots import plot_fsc, plot_masked_fsc, plot_slices
    from ..engine.reconstruct import reconstruct_particles
    from ..engine.resolution import write_resolution_outputs
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.pad < 1:
        raise InputError(f"--pad must be at least 1 (1: no oversampling, 2: the default), got {a.pad}")
    dev = device(a.device)
    ps = read_particles(a.particles, apix=a.apix)
    ps.require(poses=True, ctf=not a.no_ctf)
    ps.check_stacks()
    mask = None
    if a.mask:
        mask, mapix = read_mask(a.mask)
        check_volume_matches("mask", mask.shape, mapix, ps.box, ps.apix)
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
    res = write_resolution_outputs(out, {"map": (r.half1, r.half2)}, mask, ps.apix, gain=None,  # docs/resolution.md
                                   plot_fsc=plot_masked_fsc, device=dev)["fsc"]["map"]
    print(f"reconstruct: resolution {r.res_0143:.2f} Å (FSC 0.143), {r.res_05:.2f} Å (FSC 0.5); "
          + (f"masked FSC corrected by phase randomisation {res['resolution_A']:.2f} Å; " if mask is not None else "")
          + f"local resolution in locres_map.mrc; outputs in {out}", flush=True)
