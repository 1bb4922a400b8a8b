"""`flexplugin flex-prep`, `flex-mesh` and `flex-train`: argument definitions and handlers.

Every option mirrors a cryoSPARC 3D Flex Data Prep / Mesh Prep / Training parameter (key in the help
text) with cryoSPARC's default, unless stated.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

LATENT_LABEL = "rlnFlexLatent{}"  # 1-based columns of particles_flex.star (latents.csv: engine/latents.py)
ID = "rlnImageId"


from .cli import _add_common as _add_device  # noqa: E402  --device/--threads, defined once in cli.py
from .cli import _device  # noqa: E402
from .engine.atomic import atomic_path, save_plot, savetxt, to_csv, torch_save, write_json  # noqa: E402


def _int_list(s: str | None) -> list[int] | None:
    return None if not s else [int(x) for x in s.replace(";", ",").split(",") if x.strip()]


def _option_ints(value: str | None, option: str, example: str) -> list[int] | None:
    """A comma-separated list of integers given to `option`; anything else is an InputError showing `example`."""
    from .engine.errors import InputError
    try:
        return _int_list(value)
    except ValueError:
        raise InputError(f"{option} {value!r} must be comma-separated whole numbers, e.g. '{example}'") from None


def _check_blank_map(vol: np.ndarray, path: str, option: str) -> None:
    """A map that is all one value (all zeros, say) holds no structure: refuse it before any work."""
    from .engine.errors import InputError
    lo, hi = float(np.min(vol)), float(np.max(vol))
    if lo == hi:
        raise InputError(f"{option} {path} holds the same value ({lo:g}) in every voxel: no structure to work "
                         "on; give the consensus map (e.g. from a 3D refinement)")


def _check_boxes(a: argparse.Namespace) -> None:
    """--crop and --train-box, when given, are positive pixel counts (the even/range checks come later)."""
    from .engine.errors import InputError
    for opt, v in (("--crop", a.crop), ("--train-box", a.train_box)):
        if v is not None and v <= 0:
            raise InputError(f"{opt} must be an even number of pixels >= 16; got {v} (omit {opt} for the default)")


# ----------------------------------------------------------------------------------------- flex-prep
def cmd_flex_prep(a: argparse.Namespace) -> None:

    from .engine.errors import InputError
    from .engine.flex.prep import PreparedParticles, prep_spec, prep_volume
    from .engine.io import check_volume_matches, read_particles, read_volume, write_particles_star, write_volume
    _check_boxes(a)
    if a.num_particles is not None and a.num_particles < 1:
        raise InputError(f"--num-particles must be at least 1 (omit it to keep every particle), got {a.num_particles}")
    ps = read_particles(a.particles)
    ps.require(poses=True, ctf=True)
    ps.check_stacks()
    spec = prep_spec(ps.box, ps.apix, a.crop, a.train_box)
    rows = np.arange(len(ps))
    if a.num_particles:
        if a.num_particles > len(ps):
            raise InputError(f"--num-particles {a.num_particles} exceeds the {len(ps)} particles")
        rows = np.sort(np.random.default_rng(a.seed).choice(len(ps), a.num_particles, replace=False))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    vol = None
    if a.volume:
        vol, vapix = read_volume(a.volume)
        check_volume_matches("consensus volume", vol.shape, vapix, ps.box, ps.apix)
        _check_blank_map(vol, a.volume, "--volume")
    pp = PreparedParticles(ps, spec)
    stack = out / "particles_prep.mrcs"
    imgs = np.empty((len(rows), spec.train, spec.train), dtype=np.float32)
    for s in range(0, len(rows), 256):
        r = rows[s:s + 256]
        imgs[s:s + len(r)] = pp.batch(r, "cpu")["images"].numpy()
    write_volume(stack, imgs, spec.apix_train)
    t = ps.table.iloc[rows].copy()
    t["rlnImageName"] = [f"{i + 1:06d}@{stack.name}" for i in range(len(rows))]
    t["rlnOriginXAngst"] = t["rlnOriginXAngst"].astype(float)  # Å are unchanged by cropping/binning
    optics = ps.optics.copy()
    optics["rlnImagePixelSize"] = spec.apix_train
    optics["rlnImageSize"] = spec.train
    write_particles_star(out / "particles_prep.star", t, optics)
    if vol is not None:
        write_volume(out / "consensus_prep.mrc", prep_volume(vol, spec), spec.apix_train)
    print(f"flex-prep: {len(rows)} particles, box {ps.box} → crop {spec.crop} → training box {spec.train} "
          f"({spec.apix_train:.3f} Å/px); written to {out}", flush=True)


def add_prep_parser(sub) -> None:
    from .cli_options import add_config_options
    from .engine.flex.prep_config import PrepConfig
    p = sub.add_parser("flex-prep", help="3D Flex data prep: crop and downsample particles to a training box")
    p.add_argument("--particles", required=True, help="RELION STAR with poses and CTF")
    p.add_argument("--volume", help="consensus map to prepare alongside (same box and pixel size)")
    p.add_argument("--out", required=True, help="output folder")
    add_config_options(p, PrepConfig)  # --crop, --train-box: declared once, in PrepConfig
    p.add_argument("--num-particles", type=int, help="use a random subset of this many particles (keep_num_particles)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")
    p.set_defaults(func=cmd_flex_prep)


# ----------------------------------------------------------------------------------------- flex-mesh
def cmd_flex_mesh(a: argparse.Namespace) -> None:
    from .engine.errors import InputError
    from .engine.flex.mesh import build_mesh, save_mesh, write_mesh_pdb
    from .engine.io import read_mask, read_segmentation, read_volume, write_volume
    from .plots_flex import plot_mesh
    _option_ints(a.rigid, "--rigid", "2,4")
    _check_fuse_syntax(a.fuse)
    for opt, v, low in (("--mask-lowpass", a.mask_lowpass, "> 0"), ("--mask-dilate", a.mask_dilate, ">= 0"),
                        ("--mask-pad", a.mask_pad, ">= 0")):
        if v < 0 or (low == "> 0" and v == 0):
            raise InputError(f"{opt} must be {low} Å, got {v}")
    vol, apix = read_volume(a.volume)
    _check_blank_map(vol, a.volume, "--volume")
    mask = seg = None
    if a.mask:
        mask, mapix = read_mask(a.mask)
        if mask.shape != vol.shape or abs(mapix - apix) > 1e-3 * apix:
            raise InputError(f"mask ({mask.shape[0]} px, {mapix:.3f} Å) does not match the volume "
                             f"({vol.shape[0]} px, {apix:.3f} Å)")
    if a.segmentation:
        seg, sapix = read_segmentation(a.segmentation)  # whole-number labels: a density map is refused
        if seg.shape != vol.shape:
            raise InputError(f"segmentation box {seg.shape[0]} differs from the volume box {vol.shape[0]}")
    elif a.fuse or a.rigid:
        raise InputError("--fuse and --rigid need --segmentation")
    if a.crop is not None:
        vol, mask, seg = _crop_maps(a.crop, vol.shape[0], vol, mask, seg)
    mesh = build_mesh(vol, apix, mask=mask, cells=a.cells, rigidity_min=a.rigidity_min,
                      stiffen_low_density=a.stiffen_low_density, segmentation=seg, fuse_list=a.fuse,
                      rigid_list=a.rigid, lowpass_A=a.mask_lowpass, threshold=a.mask_threshold,
                      dilate_A=a.mask_dilate, pad_A=a.mask_pad)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_mesh(mesh, out / "mesh.pkl")
    write_mesh_pdb(mesh, out / "mesh.pdb")
    write_volume(out / "mesh_mask.mrc", mesh.mask_soft, apix)
    if a.crop is not None:
        write_volume(out / "mesh_map.mrc", vol, apix)  # the map the mesh covers, to view with mesh.pdb
    save_plot(plot_mesh, out / "mesh_slices.png", vol, mesh.tetraidx_map(), mesh.rweights)
    info = {"vertices": int(len(mesh.points)), "cells": int(len(mesh.cells)), "box": mesh.N, "apix": apix,
            "cells_across": a.cells, "rigidity_min": float(mesh.rweights.min()),
            "rigidity_max": float(mesh.rweights.max()), "segments": sorted(set(mesh.cell_segment.tolist()))}
    write_json(out / "mesh.json", info)
    print(f"flex-mesh: {info['vertices']} vertices, {info['cells']} tetrahedra over the mask; "
          f"mesh.pkl, mesh.pdb, mesh_slices.png in {out}", flush=True)


def _crop_maps(crop: int, box: int, *maps: np.ndarray | None) -> list[np.ndarray | None]:
    """The maps cropped about their centre to crop³ (the centring flex-train uses for particles, so the mesh lines
    up with the cropped training data); --crop must be even, >= 16 and <= the volume box."""
    import torch

    from .engine.errors import InputError
    from .engine.fourier import crop_center
    if crop > box or crop < 16 or crop % 2:
        raise InputError(f"--crop must be an even number of pixels >= 16 and <= the volume box {box}; got {crop}")
    return [None if m is None else crop_center(torch.from_numpy(np.ascontiguousarray(m)), crop, 3).numpy().copy()
            for m in maps]


def _check_fuse_syntax(text: str | None) -> None:
    """--fuse items look like 'parent>child' with whole-number segment labels (the tree is checked later)."""
    from .engine.errors import InputError
    for tok in (text or "").replace(";", ",").split(","):
        parts = [t.strip() for t in tok.split(">")]
        if tok.strip() and (len(parts) != 2 or not all(t.lstrip("-").isdigit() for t in parts)):
            raise InputError(f"--fuse item {tok.strip()!r} must look like 'parent>child' with segment numbers, "
                             "e.g. '1>3, 1>4, 3>2'")


def add_mesh_parser(sub) -> None:
    from .cli_options import add_config_options
    from .engine.flex.mesh_config import MeshConfig
    p = sub.add_parser("flex-mesh", help="3D Flex mesh prep: tetrahedral mesh and rigidity weights")
    p.add_argument("--volume", required=True, help="consensus map (at the training or crop box)")
    p.add_argument("--mask", help="solvent mask; made from the map when absent")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--crop", type=int,
                   help="crop the map, mask and segmentation about their centre to this box in px before meshing, "
                        "as flex-train --crop crops the particles (box_size_pix; default: the full box)")
    p.add_argument("--segmentation", help="MRC with integer segment labels (0 = none): one sub-mesh per segment")
    p.add_argument("--fuse", help="segments to fuse, a tree breadth-first root first, e.g. '1>3, 1>4, 3>2'")
    p.add_argument("--rigid", help="segments made rigid (weight 20), e.g. '2,4'")
    add_config_options(p, MeshConfig)  # --cells, ..., --mask-pad: declared once, in MeshConfig
    p.set_defaults(func=cmd_flex_mesh)


# ----------------------------------------------------------------------------------------- flex-train
def read_init_latents(path: str, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """N×M coordinates in the particles' row order from .npy (row order) or .csv/.star keyed by rlnImageId, and
    the M column names; a text, NaN or Inf cell is an InputError naming the file, column and first bad row."""
    import pandas as pd

    from .engine.errors import InputError
    p = Path(path)
    if not p.exists():
        raise InputError(f"initial latents not found: {path}")
    if p.suffix == ".npy":
        z = _read_npy_latents(p, len(ids))
        z = _finite_cells(pd.DataFrame(z), path, lambda i: f"row {i} (0-based)")
        return z, [str(j) for j in range(z.shape[1])]
    df = _read_latent_table(p)
    if ID not in df:
        raise InputError(f"{path} has no {ID} column to match particles by id")
    cols = [c for c in df.columns if c != ID and _is_coordinate_column(str(c), df[c])]
    if not cols:
        raise InputError(f"{path} has no coordinate columns")
    dup = df[ID][df[ID].duplicated()]
    if len(dup):
        raise InputError(f"{path}: particle id {dup.iloc[0]} appears more than once; each particle needs one row")
    table = df.set_index(ID)[cols]
    missing = np.setdiff1d(ids, table.index.to_numpy())
    if len(missing):
        raise InputError(f"{len(missing)} particles (e.g. id {missing[0]}) have no initial latent in {path}")
    z = _finite_cells(table.loc[ids], path, lambda i: f"particle id {ids[i]}", nan="NaN or an empty cell")
    return z, [str(c) for c in cols]


def _read_npy_latents(p: Path, n: int) -> np.ndarray:
    """An N×M numeric .npy (row order = particle order); unreadable, non-numeric or mis-shaped: InputError."""
    from .engine.errors import InputError
    try:
        z = np.load(p)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"cannot read {p} as a NumPy array ({e}); write it with numpy.save") from None
    if z.dtype.kind not in "biuf":
        raise InputError(f"{p} holds {z.dtype} values; initial latents must be numbers")
    if z.ndim != 2 or len(z) != n:
        raise InputError(f"{p} holds {z.shape} but there are {n} particles; use a file keyed by "
                         "rlnImageId (.csv/.star) when the particle sets differ")
    return z


def _read_latent_table(p: Path):
    """The table of a .star (its particles block, else the first) or .csv; unreadable: InputError."""
    import pandas as pd

    from .engine.errors import InputError
    kind = "STAR" if p.suffix == ".star" else "CSV"
    try:
        if kind == "CSV":
            return pd.read_csv(p)
        import starfile
        d = starfile.read(p, always_dict=True)
    except Exception as e:  # noqa: BLE001  (parser errors of pandas and starfile, empty files)
        raise InputError(f"cannot read the initial latents {p} as {kind}: {e}") from None
    table = d.get("particles", next(iter(d.values()), None))
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"cannot read the initial latents {p} as STAR: it holds no table (loop_) of particles")
    return table


# per-particle numbers that are not coordinates: 3DVA's scale (latents.csv, particles_3dva.star), 3dva-display's
# cluster labels and frame weights; they must never seed a latent (with --k 3 on a K=2 run, `scale` would)
NOT_COORDINATES = frozenset({"scale", "rlnFlex3dvaScale", "cluster", "rlnFlex3dvaFrameWeight"})


def _is_coordinate_column(name: str, col) -> bool:
    """Columns that may hold coordinates: rlnFlex* or non-RELION labels that are numbers (a text cell among
    numbers is kept, to be reported as bad; all-text or boolean columns, and NOT_COORDINATES, are not)."""
    import pandas as pd
    if name in NOT_COORDINATES:
        return False
    if (name.startswith("rln") and not name.startswith("rlnFlex")) or pd.api.types.is_bool_dtype(col):
        return False
    return pd.api.types.is_numeric_dtype(col) or bool(pd.to_numeric(col, errors="coerce").notna().any())


def _finite_cells(raw, path: str, where, nan: str = "NaN") -> np.ndarray:
    """`raw` (a DataFrame) as float64; the first text, NaN or Inf cell (row-major) is an InputError."""
    import pandas as pd

    from .engine.errors import InputError
    num = raw.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.argwhere(~np.isfinite(num))
    if len(bad):
        i, j = bad[0]
        v = raw.iat[i, j]
        what = f"the text {v!r}" if isinstance(v, str) else (nan if np.isnan(num[i, j]) else f"{num[i, j]}")
        raise InputError(f"{path}: column {raw.columns[j]} holds {what} at {where(i)} (the first bad row); initial "
                         "latents must be finite numbers: fix the file, or drop that column or particle")
    return num


def _check_train_args(a: argparse.Namespace) -> list[int] | None:
    """flex-train options TrainConfig does not hold: boxes > 0 when given, --init-idxs as K distinct column
    numbers (returned) and only with --init-latents; checked before any file is read."""
    from .engine.errors import InputError
    _check_boxes(a)
    if a.init_idxs is None:
        return None
    if not a.init_latents:
        raise InputError("--init-idxs chooses columns of --init-latents; give --init-latents too")
    try:
        idxs = _int_list(a.init_idxs) or []
    except ValueError:
        raise InputError(f"--init-idxs {a.init_idxs!r} must be comma-separated column numbers (0-based), "
                         "e.g. '0,1'") from None
    if len(idxs) != a.k or len(set(idxs)) != a.k or min(idxs, default=0) < 0:
        raise InputError(f"--init-idxs must name {a.k} distinct column numbers >= 0 (one per latent, --k {a.k}); "
                         f"got {a.init_idxs!r}")
    return idxs


def _write_outputs(trainer, ps, out: Path, mesh_path: str) -> dict:
    import torch

    from .engine.flex.mesh import load_mesh  # noqa: F401  (documents the file the model refers to)
    from .engine.io import write_particles_star, write_volume
    from .engine.latents import write_latents_files
    from .plots_flex import plot_activations, plot_flow, plot_latents, plot_losses
    z = trainer.latents.cpu().numpy().astype(np.float32)
    ids = ps.ids
    write_latents_files(out, ids, z)
    from .engine.cryosparc_cs import write_cs_latents_beside
    write_cs_latents_beside(ps.star_path, ids, z, out)  # latents.cs too when the particles are a cryoSPARC .cs
    cols = {LATENT_LABEL.format(k + 1): z[:, k] for k in range(z.shape[1])}
    table = ps.table.copy()
    for c, v in cols.items():
        table[c] = v
    write_particles_star(out / "particles_flex.star", table, ps.optics)
    canon = trainer.canonical().detach().cpu().numpy()
    write_volume(out / "canonical.mrc", canon, trainer.spec.apix_train)
    state = trainer.state()
    with open(mesh_path, "rb") as fh:
        state["mesh_pickle"] = fh.read()
    from .engine.identity import particle_record
    state["particles"] = particle_record(ps.table)  # lets flex-reconstruct tell another data set's particles apart
    for k in ("opt_flow", "opt_density", "opt_latent"):
        state.pop(k)
    torch_save(state, out / "model.pt")
    # diagnostics
    save_plot(plot_latents, out / "latents.png", z)
    save_plot(plot_losses, out / "losses.png", trainer.history)
    t = np.linspace(-1.5, 1.5, 121)
    zz = torch.zeros(len(t), z.shape[1])
    zz[:, 0] = torch.as_tensor(t)
    with torch.no_grad():
        _, acts = trainer.gen(zz.to(trainer.dev), return_activations=True)
    save_plot(plot_activations, out / "activations.png", t, [a.cpu().numpy() for a in acts])
    far = int(np.argmax(z[:, 0]))
    flow = trainer.flow_for(torch.as_tensor(z[far:far + 1]))[0].cpu().numpy()
    save_plot(plot_flow, out / "flow.png", canon, flow,
              title=f"flow of particle id {ids[far]} (furthest along latent 0, z0 = {z[far, 0]:.2f})")
    return {"particle_furthest_along_latent0": int(ids[far]), "max_displacement_A": float(np.abs(flow).max())}


def cmd_flex_train(a: argparse.Namespace) -> None:

    from .engine import distributed
    from .engine.errors import InputError
    from .engine.flex.mesh import load_mesh
    from .engine.flex.prep import PreparedParticles, prep_spec, prep_volume
    from .engine.flex.train import FlexTrainer, TrainConfig, normalize_init_latents
    from .engine.io import check_volume_matches, read_particles, read_volume
    dev = _device(a.device)
    say = print if distributed.is_main() else (lambda *args, **kw: None)  # rank 0 alone under torchrun
    from .cli_options import config_from_args
    cfg = config_from_args(TrainConfig, a)
    cfg.validate()
    idxs = _check_train_args(a)
    from .engine.flex.cache import open_cache, scratch_folder
    scratch = scratch_folder(a.scratch)  # --scratch / FLEXPLUGIN_SCRATCH checked before any heavy work
    if a.workers < 0:
        raise InputError(f"--workers must be >= 0 (0: batches prepared in the training process); got {a.workers}")
    ps = read_particles(a.particles)
    ps.require(poses=True, ctf=True)
    ps.check_stacks()
    vol, vapix = read_volume(a.volume)
    check_volume_matches("consensus volume", vol.shape, vapix, ps.box, ps.apix)
    _check_blank_map(vol, a.volume, "--volume")
    spec = prep_spec(ps.box, ps.apix, a.crop, a.train_box)
    mesh = load_mesh(a.mesh)
    init = None
    if a.init_latents:
        z, names = read_init_latents(a.init_latents, ps.ids)
        init = normalize_init_latents(z, a.k, idxs, names=names, source=a.init_latents)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = open_cache(ps, spec, scratch, dev, lambda m: say(m, flush=True)) if scratch else None  # flex/cache.py
    trainer = FlexTrainer(PreparedParticles(ps, spec, cache), prep_volume(vol, spec), mesh, cfg, dev, init)
    trainer.loader_workers = a.workers
    ckpt = out / "checkpoint.pt"
    if a.cont:
        if not ckpt.exists():
            raise InputError(f"--continue: no checkpoint in {out}")
        trainer.load_checkpoint(ckpt)
        say(f"flex-train: continuing after epoch {trainer.epoch}", flush=True)
    elif ckpt.exists():
        raise InputError(f"{out} already holds a training checkpoint; use --continue to resume it or a new --out")
    world = distributed.world()
    say(f"flex-train: {len(ps)} particles, box {ps.box} → training box {spec.train} ({spec.apix_train:.3f} Å/px), "
        f"K={cfg.k}, mesh {len(mesh.points)} vertices / {len(mesh.cells)} cells, "
        f"{cfg.epochs}+{cfg.extra_epochs} epochs, device {dev}"
        + (f", {world} processes (about {-(-len(ps) // world)} particles each)" if world > 1 else ""), flush=True)
    t0 = time.time()
    trainer.fit(out, stop_after=a.stop_after)
    if not distributed.is_main():
        return
    info = _write_outputs(trainer, ps, out, a.mesh)
    info.update({"epochs_done": trainer.epoch, "seconds": time.time() - t0, "k": cfg.k, "train_box": spec.train,
                 "apix_train": spec.apix_train, "crop": spec.crop, "particles": len(ps), "scale": trainer.scale,
                 "world_size": world, "particles_per_rank": -(-len(ps) // world)})
    write_json(out / "train.json", info)
    print(f"flex-train: done after {trainer.epoch} epochs; model.pt, latents.npy/csv, particles_flex.star, "
          f"canonical.mrc and plots in {out}", flush=True)


def add_train_parser(sub) -> None:
    from .cli_options import add_config_options
    from .engine.flex.config import TrainConfig
    from .engine.flex.prep_config import PrepConfig
    p = sub.add_parser("flex-train", help="3D Flex training: flow generator, canonical map and latents")
    p.add_argument("--particles", required=True, help="RELION STAR with poses and CTF")
    p.add_argument("--volume", required=True, help="consensus map (same box and pixel size as the particles)")
    p.add_argument("--mesh", required=True, help="mesh.pkl from flex-mesh, built on the map at the crop box")
    p.add_argument("--out", required=True, help="output folder (checkpoints, model, latents, plots)")
    p.add_argument("--init-latents", help="initial latents: .npy in particle order, or .csv/.star keyed by "
                                          "rlnImageId (e.g. 3DVA's latents.csv) (flex_latent_ext_init)")
    p.add_argument("--init-idxs", help="which columns of --init-latents seed the K latents: K distinct 0-based "
                                       "column numbers, e.g. '0,1' (default: the first K)")
    add_config_options(p, PrepConfig)  # --crop, --train-box
    add_config_options(p, TrainConfig)  # --k, --layers, ..., --search-kmax: declared once, in TrainConfig
    p.add_argument("--continue", dest="cont", action="store_true",
                   help="resume from the checkpoint in --out (finished epochs are kept)")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate an interruption
    p.add_argument("--scratch", help="folder for a prepared-particles cache (the images at the training box, "
                                     "float16, built once and reused; default: $FLEXPLUGIN_SCRATCH, else none)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader worker processes that read and prepare the next batches while the current one "
                        "trains (default 0: in the training process; try 2-4 beside a GPU)")
    _add_device(p)
    p.set_defaults(func=cmd_flex_train)


# ----------------------------------------------------------------------------------------- flex-generate
def _write_series(vols: np.ndarray, points: np.ndarray, folder: Path, apix: float, first: int = 0) -> list[str]:
    """vol_NNN.mrc per point (the latent point in the MRC header label) and points.csv beside them."""
    import mrcfile
    import pandas as pd
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


def _parse_generate_options(a: argparse.Namespace) -> dict:
    """flex-generate's options checked before the model is read: --box, --frames, --percentile, --atlas-*,
    --points/--from-particles. Returns the parsed box (int, or 'train'/'full') and atlas axes."""
    from .engine.errors import InputError
    box = a.box.strip().lower()
    if box not in ("train", "full"):
        try:
            box = int(box)
        except ValueError:
            raise InputError(f"--box {a.box!r} must be 'train', 'full' or a number of pixels, e.g. --box 128") from None
        if box < 16 or box % 2:
            raise InputError(f"--box must be an even number of pixels >= 16, got {box}")
    if a.frames < 2:
        raise InputError(f"--frames must be at least 2, got {a.frames}")
    if not 0 <= a.percentile < 50:
        raise InputError(f"--percentile must be in [0, 50): each axis spans the [p, 100-p] percentiles, so p >= 50 "
                         f"reverses or empties the range; got {a.percentile}")
    if a.points and a.from_particles:
        raise InputError("give --points or --from-particles, not both")
    axes = None
    if not a.no_atlas:
        if a.atlas_grid < 2:
            raise InputError(f"--atlas-grid must be at least 2 points per axis, got {a.atlas_grid}")
        if a.atlas_axes is not None:
            axes = _option_ints(a.atlas_axes, "--atlas-axes", "0,1")
            if len(axes) != 2 or axes[0] == axes[1] or min(axes) < 0:
                raise InputError(f"--atlas-axes must name two different latent axes (0-based), e.g. '0,1'; "
                                 f"got {a.atlas_axes!r}")
    return {"box": box, "atlas_axes": axes}


def _particle_ids(spec: str) -> list[int]:
    """--from-particles: a file with one id per line, or comma-separated ids."""
    from .engine.errors import InputError
    src = Path(spec)
    if src.is_file():
        try:
            return np.loadtxt(src, dtype=np.int64, ndmin=1).tolist()
        except ValueError as e:
            raise InputError(f"--from-particles {spec}: expected one particle id (a whole number) per line ({e})") \
                from None
    try:
        ids = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        ids = []
    if not ids:
        raise InputError(f"--from-particles {spec!r} is neither a file (not found) nor comma-separated particle ids, "
                         "e.g. '12,57,301'")
    return ids


def cmd_flex_generate(a: argparse.Namespace) -> None:
    import torch

    from .engine.errors import InputError
    from .engine.flex.generate import (
        axis_series,
        check_generation_memory,
        check_points_range,
        load_model,
        points_from_particles,
        read_points,
    )
    from .engine.io import read_volume
    from .plots_flex import plot_atlas, plot_series
    opts = _parse_generate_options(a)
    ids = _particle_ids(a.from_particles) if a.from_particles else None
    dev = _device(a.device)
    model = load_model(a.model, dev)
    out = Path(a.out)
    m = {"train": model.train_box, "full": model.crop}.get(opts["box"], opts["box"])
    ax = None
    if not a.no_atlas and model.k >= 1:
        ax = opts["atlas_axes"] or ([0, 1] if model.k >= 2 else [0, 0])
        if max(ax) >= model.k:
            raise InputError(f"--atlas-axes {a.atlas_axes}: the model has K={model.k} latent axes (0 to "
                             f"{model.k - 1})")
    pts = None
    if a.points:
        pts = read_points(a.points, model.k)
        check_points_range(pts, model.latents, a.points)
    elif ids is not None:
        pts = points_from_particles(model, ids)
    canonical = None
    if a.map:
        hv, hapix = read_volume(a.map)
        if hv.shape[-1] != m:
            raise InputError(f"--map is {hv.shape[-1]} px but the output box is {m}; pass --box {hv.shape[-1]}")
        if abs(hapix - model.apix_at(m)) > 1e-3 * hapix:
            raise InputError(f"--map has {hapix:.4f} Å/px, the output box needs {model.apix_at(m):.4f}")
        _check_blank_map(hv, a.map, "--map")
        canonical = torch.as_tensor(hv, device=dev)
    check_generation_memory(model, m, len(pts) if pts is not None else a.frames, dev)
    out.mkdir(parents=True, exist_ok=True)
    apix_m = model.apix_at(m)
    summary = {"box": m, "apix": apix_m, "series": []}
    from .chimerax import MESH_CMM, mesh_markers, surface_level, write_marker_file, write_series_script
    markers = write_marker_file(out / MESH_CMM, *mesh_markers(model.mesh),  # the mesh, for the ChimeraX scripts
                                radius=model.mesh.cube_size * model.mesh.psize_A / 10)
    if pts is not None:
        vols = model.volumes(pts, m, canonical)
        names = _write_series(vols, pts, out, apix_m)
        write_series_script(out / "series.cxc", [out / n for n in names], surface_level(vols[len(vols) // 2]),
                            markers)
        summary["series"].append({"name": "points", "folder": ".", "volumes": names, "chimerax": "series.cxc"})
        save_plot(plot_series, out / "series.png", vols, title="generated at the given points")
    else:
        for k, pts in enumerate(axis_series(model.latents, a.frames, a.percentile)):
            vols = model.volumes(pts, m, canonical)
            folder = out / f"series_{k:02d}"
            names = _write_series(vols, pts, folder, apix_m)
            write_series_script(out / f"series_{k:02d}.cxc", [folder / n for n in names],
                                surface_level(vols[len(vols) // 2]), markers)
            save_plot(plot_series, out / f"series_{k:02d}.png", vols, title=f"latent {k}: {pts[0, k]:.2f} → {pts[-1, k]:.2f}")
            summary["series"].append({"name": f"latent {k}", "folder": folder.name, "volumes": names,
                                      "chimerax": f"series_{k:02d}.cxc"})
            print(f"flex-generate: latent {k}: {len(vols)} volumes in {folder}", flush=True)
    if ax is not None:
        g = a.atlas_grid
        z = model.latents
        lo = np.percentile(z[:, ax], 1, axis=0)
        hi = np.percentile(z[:, ax], 99, axis=0)
        gx, gy = np.linspace(lo[0], hi[0], g), np.linspace(lo[1], hi[1], g)
        grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), -1)  # (G, G, 2): [row=y, col=x]
        pts = np.tile(np.median(z, 0), (g * g, 1)).astype(np.float32)
        pts[:, ax[0]] = grid[..., 0].ravel()
        pts[:, ax[1]] = grid[..., 1].ravel()
        thumbs = model.volumes(pts, model.train_box).sum(1).reshape(g, g, model.train_box, model.train_box)
        save_plot(plot_atlas, out / "atlas.png", z[:, ax], grid, thumbs, axes_idx=tuple(ax))
        summary["atlas"] = "atlas.png"
    write_json(out / "generate.json", summary)
    print(f"flex-generate: volumes at box {m} ({apix_m:.3f} Å/px) written to {out}", flush=True)


def add_generate_parser(sub) -> None:
    p = sub.add_parser("flex-generate", help="3D Flex generator: volumes along the latent space and the atlas")
    p.add_argument("--model", required=True, help="model.pt from flex-train, or its folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--frames", type=int, default=41, help="volumes per latent axis (flex_gen_num_pts; 41, odd "
                                                           "puts the centre of the range in the middle)")
    p.add_argument("--percentile", type=float, default=1.0,
                   help="each axis spans the particles' [p, 100-p] percentiles (default 1)")
    p.add_argument("--points", help="CSV of custom latent points: one per row, K comma-separated values, no header")
    p.add_argument("--from-particles", help="ids (comma-separated, or a file with one id per line): generate at "
                                            "their mean latent")
    p.add_argument("--box", default="train", help="'train' (training box, default), 'full' (crop box: the flow is "
                                                  "re-rasterised on the finer grid) or a number of pixels")
    p.add_argument("--map", help="canonical map to convect instead of the training one, e.g. flex_map.mrc from "
                                 "flex-reconstruct (its box and pixel size must match --box)")
    p.add_argument("--no-atlas", action="store_true", help="skip the latent atlas")
    p.add_argument("--atlas-axes", help="the two latent axes of the atlas (default 0,1)")
    p.add_argument("--atlas-grid", type=int, default=7, help="atlas grid points per axis (default 7)")
    _add_device(p)
    p.set_defaults(func=cmd_flex_generate)


# ----------------------------------------------------------------------------------------- flex-reconstruct
def cmd_flex_reconstruct(a: argparse.Namespace) -> None:
    from .engine.errors import InputError
    from .engine.flex.generate import check_model_particles, load_model
    from .engine.flex.reconstruct import check_options, flex_reconstruct
    from .engine.io import read_mask, read_particles, write_volume
    from .plots import plot_fsc, plot_slices
    check_options(a.iterations, a.batch_size, a.reg, a.tol, a.bins, a.flow_tol, a.max_bins)
    dev = _device(a.device)
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

            from .engine.fourier import crop_center
            if mask.shape[-1] != ps.box:
                raise InputError(f"mask is {mask.shape[-1]} px; expected the particle box {ps.box} or crop box {model.crop}")
            mask = crop_center(torch.as_tensor(mask), model.crop, 3).numpy()
    from .engine import distributed
    world = distributed.world()  # under torchrun every rank inserts its share; rank 0 alone solves and writes
    out = Path(a.out)
    if distributed.is_main():
        print(f"flex-reconstruct: {len(ps)} particles at the crop box {model.crop} ({ps.apix:.3f} Å/px), latent-binned "
              f"preconditioned CG (at most {a.iterations} iterations per half map, tolerance {a.tol:g}), device {dev}"
              + (f", {world} processes (about {-(-len(ps) // world)} particles each)" if world > 1 else ""), flush=True)
    t0 = time.time()
    r = flex_reconstruct(model, ps, iterations=a.iterations, batch_size=a.batch_size, reg_scale=a.reg, tol=a.tol,
                         do_noflex=not a.no_noflex, mask=mask, seed=a.seed, bins=a.bins, flow_tol=a.flow_tol,
                         max_bins=a.max_bins, device=dev)
    if r is None:  # not rank 0
        return
    out.mkdir(parents=True, exist_ok=True)
    files = {"flex_map.mrc": r.flex_map, "flex_half_A.mrc": r.flex_half1, "flex_half_B.mrc": r.flex_half2}
    if not a.no_noflex:
        files.update({"noflex_map.mrc": r.noflex_map, "noflex_half_A.mrc": r.noflex_half1,
                      "noflex_half_B.mrc": r.noflex_half2})
    for name, v in files.items():
        write_volume(out / name, v, ps.apix)
    freq = np.arange(len(r.fsc_flex)) / (model.crop * ps.apix)
    savetxt(out / "fsc.txt", np.stack([freq, r.fsc_flex, r.fsc_noflex], 1),
               header="frequency_1/A fsc_flex fsc_noflex", fmt="%.6f")
    curves = {"flex": r.fsc_flex}
    if not a.no_noflex:
        curves["noflex"] = r.fsc_noflex
    save_plot(plot_fsc, out / "fsc.png", curves, ps.apix, title="3D Flex reconstruction: half-map FSC"
             + (" (masked)" if mask is not None else ""))
    save_plot(plot_slices, out / "maps.png", {"flex": r.flex_map, **({"noflex": r.noflex_map} if not a.no_noflex else {})})
    info = {"particles": len(ps), "crop": model.crop, "apix": ps.apix, "iterations": a.iterations, "tol": a.tol,
            "reg_scale": a.reg, "bins": r.bins, "flow_spread_vox": r.flow_spread, "stopped": r.iterations,
            "mean_deformation_taken_out_vox": r.frame_shift_vox,
            "resolution_flex_A": r.res_flex, "resolution_noflex_A": None if a.no_noflex else r.res_noflex,
            "masked_fsc": mask is not None, "seconds": time.time() - t0,
            "world_size": world, "particles_per_rank": -(-len(ps) // world), "half_counts": list(r.half_counts),
            "objective_first_last": {k: [v[0], v[-1]] for k, v in r.objective.items()}}
    write_json(out / "reconstruct.json", info)
    from .engine.resolution import write_resolution_outputs  # masked FSC, local resolution, gain (docs/resolution.md)
    from .plots_flex import plot_masked_fsc, plot_resolution_gain
    halves = {"flex": (r.flex_half1, r.flex_half2)}
    if not a.no_noflex:
        halves["noflex"] = (r.noflex_half1, r.noflex_half2)
    res = write_resolution_outputs(out, halves, mask, ps.apix, plot_gain=plot_resolution_gain,
                                   plot_fsc=plot_masked_fsc, device=dev)
    if res.get("gain", {}).get("file"):  # the flex map coloured by the gain in ChimeraX
        from .chimerax import gain_span, surface_level, write_gain_script
        write_gain_script(out / "chimerax_gain.cxc", out / "flex_map.mrc", out / res["gain"]["file"],
                          surface_level(r.flex_map), gain_span(out / res["gain"]["file"]))
    print("flex-reconstruct: " + ", ".join(f"{k} {v['resolution_A']:.2f} Å" for k, v in res["fsc"].items())
          + (" (masked FSC corrected by phase randomisation)" if mask is not None else " (unmasked FSC)")
          + (f"; local resolution gain noflex - flex: median {res['gain']['median_A']:+.2f} Å in {res['region']}"
             if res.get("gain", {}).get("median_A") is not None else ""), flush=True)
    print(f"flex-reconstruct: flex {r.res_flex:.2f} Å"
          + ("" if a.no_noflex else f", noflex {r.res_noflex:.2f} Å") + f" (FSC 0.143); outputs in {out}", flush=True)


def add_reconstruct_parser(sub) -> None:
    from .cli_options import add_config_options
    from .engine.flex.reconstruct_config import ReconstructConfig
    p = sub.add_parser("flex-reconstruct", help="3D Flex reconstruction: high-resolution canonical map, motion undone")
    p.add_argument("--model", required=True, help="model.pt from flex-train, or its folder")
    p.add_argument("--particles", required=True, help="the particles of the training (or a subset), RELION STAR")
    p.add_argument("--out", required=True, help="output folder")
    add_config_options(p, ReconstructConfig)  # --iterations, --tol, ..., --seed: declared once, there
    p.add_argument("--no-noflex", action="store_true", help="skip the rigid baseline (flex_do_noflex_recon)")
    p.add_argument("--mask", help="mask for the FSC (particle box or crop box)")
    _add_device(p)
    p.set_defaults(func=cmd_flex_reconstruct)


def register(subparsers) -> None:
    add_prep_parser(subparsers)
    add_mesh_parser(subparsers)
    add_train_parser(subparsers)
    add_generate_parser(subparsers)
    add_reconstruct_parser(subparsers)
