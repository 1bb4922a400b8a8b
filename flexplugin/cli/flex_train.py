"""`flexplugin flex-train`: 3D Flex training, the flow generator, canonical map and latents (engine/flex/train.py);
its hyperparameters are declared once in TrainConfig (engine/flex/config.py) and PrepConfig, the initial latents
are read by engine/flex/init_latents.py and the outputs written by engine/flex/outputs.py."""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from ..engine.atomic import write_json
from ..engine.flex.loading import LOADER_WORKERS, SCRATCH_ENV
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
    p.add_argument("--scratch", type=_scratch_path,
                   help="folder for a prepared-particles cache (the images at the training box, float16, built once "
                        f"and reused); $VARIABLES are expanded by each process, e.g. '$TMPDIR' on a cluster node "
                        f"(default: ${SCRATCH_ENV}, else none)")
    p.add_argument("--workers", type=int, default=LOADER_WORKERS,
                   help="DataLoader worker processes that read and prepare the next batches while the current one "
                        f"trains (default {LOADER_WORKERS}: in the training process; try 2-4 beside a GPU)")
    add_common(p)


def _scratch_path(text: str) -> str:
    """--scratch with its environment variables and ~ expanded where the process runs (a node's $TMPDIR under a
    queue); a variable that is not set is an argparse error naming it, not a folder called '$NAME'."""
    path = os.path.expanduser(os.path.expandvars(text))
    unset = re.findall(r"\$\{?(\w+)", path)
    if unset:
        raise argparse.ArgumentTypeError(f"{text}: the environment variable {unset[0]} is not set")
    return path


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
    from ..engine.flex.init_latents import read_init_latents
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
