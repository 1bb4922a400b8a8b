"""`flexplugin flex-reconstruct`: the high-resolution canonical map with the motion undone (engine/flex/reconstruct.py);
its settings are declared once in ReconstructConfig (engine/flex/reconstruct_config.py) and its files written by
engine/flex/outputs.py and engine/resolution.py (masked FSC, local resolution and its gain)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..engine.atomic import write_json
from .common import add_common, add_config_options, device

COMMAND = "flex-reconstruct"
HELP = "3D Flex reconstruction: high-resolution canonical map, motion undone"


def add_args(p: argparse.ArgumentParser) -> None:
    """The model, particles and output folder, ReconstructConfig's options (--no-noflex among them) and the FSC
    mask."""
    from ..engine.flex.reconstruct_config import ReconstructConfig
    p.add_argument("--model", required=True, help="model.pt from flex-train, or its folder")
    p.add_argument("--particles", required=True, help="the particles of the training (or a subset), RELION STAR")
    p.add_argument("--out", required=True, help="output folder")
    add_config_options(p, ReconstructConfig)  # --iterations, --tol, ..., --no-noflex, --seed: declared once, there
    p.add_argument("--mask", help="mask for the FSC (particle box or crop box)")
    add_common(p)


def main(a: argparse.Namespace) -> None:
    """Reconstruct the canonical map (and the rigid baseline) of --particles with the model's motion undone, into
    --out (engine/flex/outputs.py; under torchrun every rank inserts its share)."""
    from ..engine.errors import InputError
    from ..engine.flex.generate import check_model_particles, load_model
    from ..engine.flex.outputs import write_reconstruction
    from ..engine.flex.reconstruct import check_options, flex_reconstruct
    from ..engine.io import read_mask, read_particles
    from ..engine.plots import plot_masked_fsc, plot_resolution_gain
    from ..engine.resolution import write_resolution_outputs
    check_options(a.iterations, a.batch_size, a.reg, a.tol, a.bins, a.flow_tol, a.max_bins, a.flow_noise)
    dev = device(a.device)
    model = load_model(a.model, dev)
    ps = read_particles(a.particles)
    check_model_particles(model, ps, a.particles)  # not another data set whose ids overlap the model's
    ps.require(poses=True, ctf=True)
    ps.check_stacks()
    mask = None
    if a.mask:
        mask, mapix = read_mask(a.mask)
        if mask.shape[-1] != model.crop:
            import torch

            from ..engine.fourier import crop_center
            if mask.shape[-1] != ps.box:
                raise InputError(f"mask is {mask.shape[-1]} px; expected the particle box {ps.box} or crop box "
                                 f"{model.crop}")
            mask = crop_center(torch.as_tensor(mask), model.crop, 3).numpy()
    from ..engine import distributed
    world = distributed.world()  # under torchrun every rank inserts its share; rank 0 alone solves and writes
    out = Path(a.out)
    if distributed.is_main():
        print(f"flex-reconstruct: {len(ps)} particles at the crop box {model.crop} ({ps.apix:.3f} Å/px), "
              f"latent-binned preconditioned CG (at most {a.iterations} iterations per half map, tolerance "
              f"{a.tol:g}), device {dev}"
              + (f", {world} processes (about {-(-len(ps) // world)} particles each)" if world > 1 else ""),
              flush=True)
    t0 = time.time()
    r = flex_reconstruct(model, ps, iterations=a.iterations, batch_size=a.batch_size, reg_scale=a.reg, tol=a.tol,
                         do_noflex=a.noflex, mask=mask, seed=a.seed, bins=a.bins, flow_tol=a.flow_tol,
                         max_bins=a.max_bins, flow_noise=a.flow_noise, device=dev)
    if r is None:  # not rank 0
        return
    write_reconstruction(out, r, model.crop, ps.apix, noflex=a.noflex, masked=mask is not None)
    info = {"particles": len(ps), "crop": model.crop, "apix": ps.apix, "iterations": a.iterations, "tol": a.tol,
            "reg_scale": a.reg, "bins": r.bins, "flow_spread_vox": r.flow_spread, "stopped": r.iterations,
            "mean_deformation_taken_out_vox": r.frame_shift_vox, "flow_noise_train_vox": a.flow_noise,
            "vertices_still": r.vertices_still,
            "resolution_flex_A": r.res_flex, "resolution_noflex_A": r.res_noflex if a.noflex else None,
            "masked_fsc": mask is not None, "seconds": time.time() - t0,
            "world_size": world, "particles_per_rank": -(-len(ps) // world), "half_counts": list(r.half_counts),
            "objective_first_last": {k: [v[0], v[-1]] for k, v in r.objective.items()}}
    write_json(out / "reconstruct.json", info)
    halves = {"flex": (r.flex_half1, r.flex_half2)}
    if a.noflex:
        halves["noflex"] = (r.noflex_half1, r.noflex_half2)
    res = write_resolution_outputs(out, halves, mask, ps.apix, plot_gain=plot_resolution_gain,
                                   plot_fsc=plot_masked_fsc, device=dev)
    if res.get("gain", {}).get("file"):  # the flex map coloured by the gain in ChimeraX
        from ..chimerax import gain_span, surface_level, write_gain_script
        write_gain_script(out / "chimerax_gain.cxc", out / "flex_map.mrc", out / res["gain"]["file"],
                          surface_level(r.flex_map), gain_span(out / res["gain"]["file"]))
    print("flex-reconstruct: " + ", ".join(f"{k} {v['resolution_A']:.2f} Å" for k, v in res["fsc"].items())
          + (" (masked FSC corrected by phase randomisation)" if mask is not None else " (unmasked FSC)")
          + (f"; local resolution gain noflex - flex: median {res['gain']['median_A']:+.2f} Å in {res['region']}"
             if res.get("gain", {}).get("median_A") is not None else ""), flush=True)
    print(f"flex-reconstruct: flex {r.res_flex:.2f} Å"
          + (f", noflex {r.res_noflex:.2f} Å" if a.noflex else "") + f" (FSC 0.143); outputs in {out}", flush=True)
