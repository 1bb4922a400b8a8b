"""Files of the 3D Flex commands' output folders, written the way va3d/outputs.py writes a 3DVA run's: plain values
in, files and plots (flex/plots.py, ../plots.py) out, so the command line only reads inputs and calls these.

flex-train (`write_training_outputs`):
    latents.npy, latents.csv      the coordinates, by particle id (engine/latents.py); latents.cs for a .cs input
    particles_flex.star           the input STAR plus rlnFlexLatent1..K
    canonical.mrc, model.pt       the canonical map at the training box; the model flex-generate/-reconstruct load
    latents.png, losses.png, activations.png, flow.png
flex-generate (`write_series`, `write_atlas`): vol_NNN.mrc with points.csv per series, series*.png, atlas.png
flex-reconstruct (`write_reconstruction`): flex/noflex maps and half maps, fsc.txt, fsc.png, maps.png
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path, save_plot, savetxt, to_csv, torch_save
from ..plots import plot_fsc, plot_slices
from . import plots as fp

__all__ = ["STAR_LATENT", "write_atlas", "write_reconstruction", "write_series", "write_series_plot",
           "write_training_outputs"]

STAR_LATENT = "rlnFlexLatent{}"  # 1-based columns of particles_flex.star (latents.csv: engine/latents.py)


def write_training_outputs(trainer, ps, out: Path, mesh_path: str | os.PathLike) -> dict:
    """Write a finished training's latents, particles STAR, canonical map, model and diagnostic plots into `out`
    (`trainer`: flex/train.FlexTrainer, `ps`: its io.ParticleSet, `mesh_path`: the mesh.pkl it was built on,
    stored in the model); returns the facts train.json records about the flow plot."""
    import torch

    from ..cryosparc_cs import write_cs_latents_beside
    from ..identity import particle_record
    from ..io import write_particles_star, write_volume
    from ..latents import write_latents_files
    out = Path(out)
    z = trainer.latents.cpu().numpy().astype(np.float32)
    ids = ps.ids
    write_latents_files(out, ids, z)
    write_cs_latents_beside(ps.star_path, ids, z, out)  # latents.cs too when the particles are a cryoSPARC .cs
    table = ps.table.copy()
    for k in range(z.shape[1]):
        table[STAR_LATENT.format(k + 1)] = z[:, k]
    write_particles_star(out / "particles_flex.star", table, ps.optics)
    canon = trainer.canonical().detach().cpu().numpy()
    write_volume(out / "canonical.mrc", canon, trainer.spec.apix_train)
    state = trainer.state()
    with open(mesh_path, "rb") as fh:
        state["mesh_pickle"] = fh.read()
    state["particles"] = particle_record(ps.table)  # lets flex-reconstruct tell another data set's particles apart
    for key in ("opt_flow", "opt_density", "opt_latent"):
        state.pop(key)
    torch_save(state, out / "model.pt")
    # diagnostics
    save_plot(fp.plot_latents, out / "latents.png", z)
    save_plot(fp.plot_losses, out / "losses.png", trainer.history)
    t = np.linspace(-1.5, 1.5, 121)
    zz = torch.zeros(len(t), z.shape[1])
    zz[:, 0] = torch.as_tensor(t)
    with torch.no_grad():
        _, acts = trainer.gen(zz.to(trainer.dev), return_activations=True)
    save_plot(fp.plot_activations, out / "activations.png", t, [a.cpu().numpy() for a in acts])
    far = int(np.argmax(z[:, 0]))
    flow = trainer.flow_for(torch.as_tensor(z[far:far + 1]))[0].cpu().numpy()
    save_plot(fp.plot_flow, out / "flow.png", canon, flow,
              title=f"flow of particle id {ids[far]} (furthest along latent 0, z0 = {z[far, 0]:.2f})")
    return {"particle_furthest_along_latent0": int(ids[far]), "max_displacement_A": float(np.abs(flow).max())}


def write_series(vols: np.ndarray, points: np.ndarray, folder: Path, apix: float, first: int = 0) -> list[str]:
    """vol_NNN.mrc per latent point (the point in the MRC header label) and points.csv beside them, in `folder`;
    returns the volume file names."""
    import mrcfile
    import pandas as pd
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, (v, z) in enumerate(zip(vols, points)):
        name = f"vol_{first + i:03d}.mrc"
        with atomic_path(folder / name) as tmp, mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(v, dtype=np.float32))
            m.voxel_size = apix
            m.header.label[1] = ("flexplugin z=" + ",".join(f"{x:.5f}" for x in z)).encode()[:80]
            m.header.nlabl = 2
        names.append(name)
    cols = {f"z{k}": points[:, k] for k in range(points.shape[1])}
    to_csv(pd.DataFrame({"volume": names, **cols}), folder / "points.csv", index=False)
    return names


def write_series_plot(vols: np.ndarray, path: Path, title: str) -> str:
    """series.png: the central slices of a generated series (flex/plots.plot_series)."""
    return save_plot(fp.plot_series, path, vols, title=title)


def write_atlas(model, path: Path, axes: tuple[int, int], grid: int) -> str:
    """atlas.png: maps generated on a `grid`×`grid` lattice over the 1-99 % range of two latent axes (the others
    at their medians), drawn as projections over the particles' latents (`model`: flex/generate's loaded model)."""
    z = model.latents
    ax = list(axes)
    lo = np.percentile(z[:, ax], 1, axis=0)
    hi = np.percentile(z[:, ax], 99, axis=0)
    gx, gy = np.linspace(lo[0], hi[0], grid), np.linspace(lo[1], hi[1], grid)
    lattice = np.stack(np.meshgrid(gx, gy, indexing="xy"), -1)  # (G, G, 2): [row=y, col=x]
    pts = np.tile(np.median(z, 0), (grid * grid, 1)).astype(np.float32)
    pts[:, ax[0]] = lattice[..., 0].ravel()
    pts[:, ax[1]] = lattice[..., 1].ravel()
    thumbs = model.volumes(pts, model.train_box).sum(1).reshape(grid, grid, model.train_box, model.train_box)
    return save_plot(fp.plot_atlas, path, z[:, ax], lattice, thumbs, axes_idx=tuple(ax))


def write_reconstruction(out: Path, r: Any, crop: int, apix: float, noflex: bool, masked: bool) -> None:
    """flex-reconstruct's maps (flex, and noflex when `noflex`), half maps, fsc.txt and the FSC and slice plots
    (`r`: flex/reconstruct's result; `crop`: the box of the maps; `masked`: the FSC was computed in a mask)."""
    from ..io import write_volume
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"flex_map.mrc": r.flex_map, "flex_half_A.mrc": r.flex_half1, "flex_half_B.mrc": r.flex_half2}
    if noflex:
        files.update({"noflex_map.mrc": r.noflex_map, "noflex_half_A.mrc": r.noflex_half1,
                      "noflex_half_B.mrc": r.noflex_half2})
    for name, v in files.items():
        write_volume(out / name, v, apix)
    freq = np.arange(len(r.fsc_flex)) / (crop * apix)
    savetxt(out / "fsc.txt", np.stack([freq, r.fsc_flex, r.fsc_noflex], 1),
            header="frequency_1/A fsc_flex fsc_noflex", fmt="%.6f")
    curves = {"flex": r.fsc_flex}
    if noflex:
        curves["noflex"] = r.fsc_noflex
    save_plot(plot_fsc, out / "fsc.png", curves, apix, title="3D Flex reconstruction: half-map FSC"
              + (" (masked)" if masked else ""))
    save_plot(plot_slices, out / "maps.png", {"flex": r.flex_map, **({"noflex": r.noflex_map} if noflex else {})})
