"""`flexplugin flex-prep`: 3D Flex data prep, the particles (and consensus) cropped and binned to the training
box (engine/flex/prep.py); the boxes are declared once in PrepConfig (engine/flex/prep_config.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .common import add_config_options, check_blank_map, check_boxes

COMMAND = "flex-prep"
HELP = "3D Flex data prep: crop and downsample particles to a training box"


def add_args(p: argparse.ArgumentParser) -> None:
    """The particles, consensus and output folder, PrepConfig's boxes and an optional random subset."""
    from ..engine.flex.prep_config import PrepConfig
    p.add_argument("--particles", required=True, help="RELION STAR with poses and CTF")
    p.add_argument("--volume", help="consensus map to prepare alongside (same box and pixel size)")
    p.add_argument("--out", required=True, help="output folder")
    add_config_options(p, PrepConfig)  # --crop, --train-box: declared once, in PrepConfig
    p.add_argument("--num-particles", type=int, help="use a random subset of this many particles (keep_num_particles)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset")


def main(a: argparse.Namespace) -> None:
    """Crop and bin the particles (and the consensus) of --particles into --out at the training box."""
    from ..engine.errors import InputError
    from ..engine.flex.prep import PreparedParticles, prep_spec, prep_volume
    from ..engine.io import check_volume_matches, read_particles, read_volume, write_particles_star, write_volume
    check_boxes(a)
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
        check_blank_map(vol, a.volume, "--volume")
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
