"""`flexplugin flex-train`: 3D Flex training, the flow generator, canonical map and latents (engine/flex/train.py);
its hyperparameters are declared once in TrainConfig (engine/flex/config.py) and PrepConfig, and its outputs are
written by engine/flex/outputs.py. Also reads the initial latents (--init-latents)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ..engine.atomic import write_json
from ..engine.latents import ID_LABEL as ID
from .common import add_common, add_config_options, check_blank_map, check_boxes, config_from_args, device, int_list

COMMAND = "flex-train"
HELP = "3D Flex training: flow generator, canonical map and latents"


def add_args(p: argparse.ArgumentParser) -> None:
    """The particles, consensus, mesh and output folder, the initial latents, PrepConfig's and TrainConfig's
    options, --continue, the prepared-particles cache and the loader workers."""
    from ..engine.flex.config import TrainConfig
    from ..engine.flex.prep_config import PrepConfig
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
    add_common(p)


def read_init_latents(path: str, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """N×M coordinates in the particles' row order from .npy (row order) or .csv/.star keyed by rlnImageId, and
    the M column names; a text, NaN or Inf cell is an InputError naming the file, column and first bad row."""
    import pandas as pd

    from ..engine.errors import InputError
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
    from ..engine.errors import InputError
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

    from ..engine.errors import InputError
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

    from ..engine.errors import InputError
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
    from ..engine.errors import InputError
    check_boxes(a)
    if a.init_idxs is None:
        return None
    if not a.init_latents:
        raise InputError("--init-idxs chooses columns of --init-latents; give --init-latents too")
    try:
        idxs = int_list(a.init_idxs) or []
    except ValueError:
        raise InputError(f"--init-idxs {a.init_idxs!r} must be comma-separated column numbers (0-based), "
                         "e.g. '0,1'") from None
    if len(idxs) != a.k or len(set(idxs)) != a.k or min(idxs, default=0) < 0:
        raise InputError(f"--init-idxs must name {a.k} distinct column numbers >= 0 (one per latent, --k {a.k}); "
                         f"got {a.init_idxs!r}")
    return idxs


def main(a: argparse.Namespace) -> None:
    """Train (or resume with --continue) and write the model, latents, maps and plots into --out
    (engine/flex/outputs.py)."""
    from ..engine import distributed
    from ..engine.errors import InputError
    from ..engine.flex.mesh import load_mesh
    from ..engine.flex.outputs import write_training_outputs
    from ..engine.flex.prep import PreparedParticles, prep_spec, prep_volume
    from ..engine.flex.train import FlexTrainer, TrainConfig, normalize_init_latents
    from ..engine.io import check_volume_matches, read_particles, read_volume
    dev = device(a.device)
    say = print if distributed.is_main() else (lambda *args, **kw: None)  # rank 0 alone under torchrun
    cfg = config_from_args(TrainConfig, a)
    cfg.validate()
    idxs = _check_train_args(a)
    from ..engine.flex.cache import open_cache, scratch_folder
    scratch = scratch_folder(a.scratch)  # --scratch / FLEXPLUGIN_SCRATCH checked before any heavy work
    if a.workers < 0:
        raise InputError(f"--workers must be >= 0 (0: batches prepared in the training process); got {a.workers}")
    ps = read_particles(a.particles)
    ps.require(poses=True, ctf=True)
    ps.check_stacks()
    vol, vapix = read_volume(a.volume)
    check_volume_matches("consensus volume", vol.shape, vapix, ps.box, ps.apix)
    check_blank_map(vol, a.volume, "--volume")
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
    info = write_training_outputs(trainer, ps, out, a.mesh)
    info.update({"epochs_done": trainer.epoch, "seconds": time.time() - t0, "k": cfg.k, "train_box": spec.train,
                 "apix_train": spec.apix_train, "crop": spec.crop, "particles": len(ps), "scale": trainer.scale,
                 "world_size": world, "particles_per_rank": -(-len(ps) // world)})
    write_json(out / "train.json", info)
    print(f"flex-train: done after {trainer.epoch} epochs; model.pt, latents.npy/csv, particles_flex.star, "
          f"canonical.mrc and plots in {out}", flush=True)
