"""Files of a 3DVA run folder: what `flexplugin 3dva` writes and `3dva-display` reads back.

    consensus.mrc                 V0 (full box)
    component_000.mrc …           unit-norm components (full box, masked)
    latents.npy                   (N, K) float32 coordinates, input row order
    latents.csv                   rlnImageId, z0..z{K-1}, scale: the id-keyed exchange file (engine/latents.py)
    particles_3dva.star           the input STAR plus rlnFlex3dvaComponent1..K and rlnFlex3dvaScale
    explained_variance.json       per component: eigenvalue, coordinate variance, fractions (+ noise floor)
    run.json                      settings, working grid, per-iteration history, file list
    plots/*.png                   histograms, pairwise hexbins, convergence, component slices

RELION 3.1+ reads STAR files with unknown labels (it warns "will ignore (but maintain) values for the
unknown label" and writes them back; metadata_table.cpp), so the extra columns are safe there; older
readers may refuse them, hence the CSV is the exchange file and the STAR a convenience.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from ..atomic import atomic_path, save_plot
from ..cryosparc_cs import read_blocks
from ..identity import check_same_particles, particle_record
from ..io import read_particles, read_volume, write_volume
from ..latents import ID_LABEL, LATENTS_CSV, LATENTS_NPY, read_latents, write_latents_files
from .em import VA3DConfig, VA3DResult, dump_json

__all__ = ["write_run_outputs", "RunFolder", "load_run", "component_labels"]

STAR_COMPONENT = "rlnFlex3dvaComponent{}"
STAR_SCALE = "rlnFlex3dvaScale"
SCALE_COLUMN = "scale"  # the per-particle scale, an extra column of latents.csv


def component_labels(k: int) -> list[str]:
    return [STAR_COMPONENT.format(i + 1) for i in range(k)]


def _write_star_with_latents(src: str, dst: Path, ids: np.ndarray, z: np.ndarray, scales: np.ndarray,
                             image_names=None) -> None:
    """The source STAR's first len(ids) rows (the particles used, in order) plus the coordinate columns;
    rlnImageId is added when the source has none (io.ParticleSet's ids are then the 1-based rows).
    `image_names` (io.read_particles' absolute stack paths, same rows) replace rlnImageName, so the file works
    from any folder, not only from the input STAR's."""
    blocks = read_blocks(src)  # a STAR file's blocks, or a cryoSPARC .cs file's tables
    key = "particles" if "particles" in blocks else next(k for k, v in blocks.items()
                                                         if isinstance(v, pd.DataFrame) and "rlnImageName" in v)
    t = blocks[key].iloc[:len(ids)].copy()
    if image_names is not None:
        t["rlnImageName"] = np.asarray(image_names)[:len(ids)]
    if ID_LABEL not in t:
        t.insert(0, ID_LABEL, ids)
    for i, lab in enumerate(component_labels(z.shape[1])):
        t[lab] = z[:, i].astype(np.float64)
    t[STAR_SCALE] = scales.astype(np.float64)
    blocks[key] = t
    with atomic_path(dst) as tmp:
        starfile.write(blocks, tmp, overwrite=True)


def write_run_outputs(out: Path, ps, res: VA3DResult, consensus: np.ndarray, args, cfg: VA3DConfig,
                      floor: dict | None = None, seconds: float = 0.0, objective_final: float | None = None) -> dict:
    """Write every output file of a finished run (see module docstring); returns the run.json content."""
    from . import plots as pv
    out = Path(out)
    K = res.components.shape[0]
    files: dict[str, Any] = {
        "consensus": "consensus.mrc", "components": [], "latents": LATENTS_NPY, "latents_csv": LATENTS_CSV,
        "particles_star": "particles_3dva.star", "explained_variance": "explained_variance.json", "plots": {}}
    for k in range(K):
        name = f"component_{k:03d}.mrc"
        write_volume(out / name, res.components[k], ps.apix)
        files["components"].append(name)
    ids = ps.ids
    write_latents_files(out, ids, res.latents, {SCALE_COLUMN: res.scales})
    _write_star_with_latents(ps.star_path, out / "particles_3dva.star", ids, res.latents, res.scales,
                             ps.table["rlnImageName"].to_numpy())
    ev = res.eigenvalues
    comps = []
    for k in range(K):
        c = {"component": k, "eigenvalue": float(ev[k]), "fraction_of_total_eigenvalue": float(ev[k] / ev.sum()),
             "latent_variance": float(res.latent_variance[k]), "residual_power_fraction": float(res.power_fraction[k])}
        if floor is not None:
            c["above_noise_floor"] = bool(ev[k] > floor["floor_eigenvalue"])
        comps.append(c)
    evj: dict[str, Any] = {
        "definition": "eigenvalue = variance of the model density along the unit-norm component (sum over "
                      "full-box voxels, map units squared); latent_variance = variance of the reported "
                      "coordinates (shrunk by the posterior); residual_power_fraction = share of the whitened "
                      "residual image power (data minus scaled consensus, working band) that the component "
                      "explains, averaged over particles",
        "components": comps}
    if floor is not None:
        evj["noise_floor"] = floor | {"definition": "the same analysis on pose-shuffled particles; a component "
                                                    "whose eigenvalue exceeds floor_eigenvalue is above noise"}
    dump_json(out / "explained_variance.json", evj)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    f = files["plots"]
    f["histograms"] = os.path.relpath(save_plot(pv.plot_latent_histograms, plots / "histograms.png", res.latents), out)
    if K > 1:
        f["pairs"] = os.path.relpath(save_plot(pv.plot_latent_pairs, plots / "pairs.png", res.latents), out)
    f["convergence"] = os.path.relpath(save_plot(pv.plot_convergence, plots / "convergence.png", res.history), out)
    f["explained_variance"] = os.path.relpath(save_plot(
        pv.plot_explained_variance, plots / "explained_variance.png", ev,
        floor=None if floor is None else floor["floor_eigenvalue"]), out)
    f["components"] = os.path.relpath(save_plot(pv.plot_component_slices, plots / "components.png", consensus,
                                                res.components), out)
    run = {"command": "3dva", "particles": str(Path(ps.star_path).resolve()), "n_particles": len(ps),
           "mask": str(Path(args.mask).resolve()), "volume": str(Path(args.volume).resolve()) if args.volume else None,
           "box": ps.box, "apix": ps.apix, "working_box": res.working_box, "working_apix": res.working_apix,
           "config": cfg.__dict__, "global_scale": res.global_scale, "history": res.history,
           "objective_final": objective_final, "seconds": seconds, "files": files}
    dump_json(out / "run.json", run)
    return run


class RunFolder:
    """A finished 3DVA run read back: consensus, components, coordinates and its particle STAR."""

    def __init__(self, path: str | os.PathLike):
        from ..errors import InputError
        self.path = Path(path)
        rj = self.path / "run.json"
        if not rj.exists():
            raise InputError(f"{self.path} is not a finished 3dva run (no run.json); run `flexplugin 3dva` first")
        current = rj
        try:
            self.run = json.loads(rj.read_text())
            files = self.run["files"]
            current = self.path / files["consensus"]
            self.consensus, self.apix = read_volume(current)
            comps = []
            for f in files["components"]:
                current = self.path / f
                comps.append(read_volume(current)[0])
            self.components = np.stack(comps)
            current = self.path / files["latents"]
            self.latents = np.load(current)
            current = self.path / files["latents_csv"]
            self.ids = read_latents(current).ids
        except InputError as e:
            raise InputError(f"{self.path} is a damaged 3dva run: {e}; rerun `flexplugin 3dva` (with --continue "
                             "it resumes from its checkpoint)") from None
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            why = f"{type(e).__name__}: {str(e)[:200]}"
            raise InputError(f"{self.path} is a damaged 3dva run: cannot read {current} ({why}); rerun `flexplugin "
                             "3dva` (with --continue it resumes from its checkpoint)") from None
        if self.latents.ndim != 2 or len(self.latents) != len(self.ids):
            raise InputError(f"{self.path}: latents.npy and latents.csv disagree in length")

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def particles(self, star: str | None = None):
        """The ParticleSet, rows aligned with the coordinates (matched by rlnImageId)."""
        from ..errors import InputError
        ps = read_particles(star or self.run["particles"])
        pos = pd.Series(np.arange(len(ps)), index=ps.ids)
        missing = ~np.isin(self.ids, ps.ids)
        if missing.any():
            raise InputError(f"{int(missing.sum())} particles of the run (e.g. id {self.ids[missing][0]}) are not "
                             f"in {star or self.run['particles']}")
        sub = ps.subset(pos.loc[self.ids].to_numpy())
        if star is not None:
            self._check_same_particles(sub, star)
        return sub

    def _check_same_particles(self, ps, star: str) -> None:
        """Particles given in place of the run's must be the same particles under the same ids: ids that overlap
        by chance (another data set numbered from 1) would pair each coordinate with a stranger's image. The
        run's particles_3dva.star is the record (image and defocus; engine/identity.py)."""
        ref_path = self.path / self.run["files"].get("particles_star", "particles_3dva.star")
        if not ref_path.exists():
            return
        blocks = starfile.read(ref_path, always_dict=True)
        ref = blocks.get("particles", next(iter(blocks.values())))
        if ID_LABEL not in ref or "rlnImageName" not in ref:
            return
        ref = ref.set_index(pd.to_numeric(ref[ID_LABEL], errors="coerce").astype(np.int64)).loc[self.ids]
        check_same_particles(self.ids, particle_record(ref), ps, star, f"the 3dva run {self.path}")


def load_run(path: str | os.PathLike) -> RunFolder:
    return RunFolder(path)
