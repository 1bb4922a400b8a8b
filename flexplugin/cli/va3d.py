"""`flexplugin 3dva`: 3D Variability Analysis (engine/va3d/em.py); its options mirror cryoSPARC's 3D Variability
(var_3D) parameters with cryoSPARC's defaults, declared once in VA3DConfig (engine/va3d_config.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .common import add_common, add_config_options, config_from_args, device

COMMAND = "3dva"
HELP = "3D variability analysis (PPCA by EM in Fourier space)"
DESCRIPTION = ("3D Variability Analysis: fits V_i = V0 + Σ z_ik V_k to particles with known poses and CTF; writes "
               "components, per-particle coordinates and diagnostics.")


def add_args(p: argparse.ArgumentParser) -> None:
    """The particles, mask, consensus and output folder, VA3DConfig's options, --noise-floor and --continue."""
    from ..engine.va3d_config import VA3DConfig
    p.add_argument("--particles", required=True, help="RELION STAR file with poses (3D refinement) and CTF")
    p.add_argument("--mask", required=True, help="mask (MRC, same box and pixel size) applied to the components")
    p.add_argument("--volume", help="consensus map V0 (MRC); default: reconstructed from the particles")
    p.add_argument("--out", required=True, help="output folder")
    add_config_options(p, VA3DConfig)  # --k, --iterations, ..., --seed: declared once, in VA3DConfig
    p.add_argument("--noise-floor", action="store_true",
                   help="also run the analysis on pose-shuffled particles and report its explained "
                        "variance as the noise floor (doubles the run time)")
    p.add_argument("--continue", dest="cont", action="store_true",
                   help="resume the run in --out from its last checkpoint (same settings; --iterations may grow)")
    p.add_argument("--apix", type=float, help="pixel size in Å (only for RELION 3.0 files without it)")
    add_common(p)


def _check_inputs(a: argparse.Namespace):
    """Everything that can be wrong with the inputs, checked before any heavy work."""
    from ..engine.errors import InputError
    from ..engine.io import check_volume_matches, read_mask, read_particles, read_volume
    if a.k < 1:
        raise InputError(f"--k must be at least 1 (number of components), got {a.k}")
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.iterations < 1:
        raise InputError(f"--iterations must be at least 1, got {a.iterations}")
    if a.lam < 0:
        raise InputError(f"--lambda must be >= 0, got {a.lam}")
    ps = read_particles(a.particles, apix=a.apix)
    ps.require(poses=True, ctf=True)
    ps.check_stacks()
    if a.num_particles:
        if a.num_particles < 2:
            raise InputError("--num-particles must be at least 2")
        ps = ps.subset(np.arange(min(len(ps), a.num_particles)))
    if len(ps) < 2 * a.k:
        raise InputError(f"{len(ps)} particles are too few for {a.k} components")
    nyq2 = 2.0 * ps.apix
    if a.filter_res < nyq2 - 1e-6:
        raise InputError(f"--filter-res {a.filter_res} Å is finer than Nyquist ({nyq2:.3f} Å at "
                         f"{ps.apix:.3f} Å/px); use a value >= {nyq2:.3f} Å (typically 4–8 Å)")
    coarsest = ps.box * ps.apix / 4  # the Nyquist of an 8-px working box, the smallest 3DVA uses
    if a.filter_res > coarsest + 1e-6:
        raise InputError(f"--filter-res {a.filter_res:g} Å is coarser than {coarsest:.1f} Å (a quarter of the "
                         f"{ps.box * ps.apix:.0f} Å box): the components would hold only the lowest few Fourier "
                         "shells; use a value near the resolution of the variability (typically 4–8 Å)")
    if a.highpass_res is not None and a.highpass_res <= a.filter_res:
        raise InputError(f"--highpass-res ({a.highpass_res} Å) must be coarser (larger) than --filter-res "
                         f"({a.filter_res} Å)")
    if a.box_crop is not None and (a.box_crop % 2 or a.box_crop < 8 or a.box_crop > ps.box):
        raise InputError(f"--box-crop must be an even number of pixels between 8 and the particle box "
                         f"{ps.box}, got {a.box_crop}")
    mask, mapix = read_mask(a.mask)
    check_volume_matches("mask", mask.shape, mapix, ps.box, ps.apix)
    vol = None
    if a.volume:
        vol, vapix = read_volume(a.volume)
        check_volume_matches("volume", vol.shape, vapix, ps.box, ps.apix)
        if float(vol.min()) == float(vol.max()):
            raise InputError(f"--volume {a.volume} holds the same value ({float(vol.min()):g}) in every voxel: no "
                             "consensus to vary around; give the consensus map, or omit --volume to reconstruct it")
    if a.scales == "input":
        from ..engine.va3d.em import INPUT_SCALE_LABELS
        if not any(c in ps.table for c in INPUT_SCALE_LABELS):
            raise InputError(f"--scales input needs a {' or '.join(INPUT_SCALE_LABELS)} column in "
                             f"{a.particles}; use --scales optimal or none")
    return ps, mask, vol


def main(a: argparse.Namespace) -> None:
    """Run 3DVA (or resume it with --continue) and write its outputs (engine/va3d/outputs.py) into --out."""
    from ..engine import distributed
    from ..engine.errors import InputError
    from ..engine.io import write_volume
    from ..engine.va3d.em import CHECKPOINT, VA3D, file_digest, run_loop
    from ..engine.va3d.outputs import write_run_outputs
    from ..engine.va3d_config import VA3DConfig
    dev = device(a.device)
    ps, mask, vol = _check_inputs(a)
    say, writer, world = distributed.say, distributed.is_main(), distributed.world()  # rank 0 alone writes
    out = Path(a.out)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not a.cont:
        raise InputError(f"{out} already holds a 3DVA run ({CHECKPOINT}); pass --continue to resume it or "
                         "choose an empty output folder")
    if a.cont and not ckpt.exists():
        raise InputError(f"--continue: no 3DVA checkpoint ({CHECKPOINT}) in {out}; drop --continue to start a new "
                         "run, or give the folder of the run to resume")
    if a.cont:
        _check_checkpoint(ckpt)
    cfg = config_from_args(VA3DConfig, a, device=str(dev))
    t0 = time.time()
    cons_path = out / "consensus.mrc"
    resuming = a.cont and ckpt.exists()
    if vol is None:
        if resuming and cons_path.exists():
            from ..engine.io import read_volume
            vol = read_volume(cons_path)[0]
        else:
            from ..engine.reconstruct import reconstruct_particles
            say(f"3dva: no --volume given: reconstructing the consensus from {len(ps)} particles")
            rec = reconstruct_particles(ps, batch_size=cfg.batch_size, pad=2, device=str(dev), seed=a.seed,
                                        mask=mask)
            vol = rec.full
            say(f"3dva: consensus resolution {rec.res_0143:.2f} Å (FSC 0.143, masked)")
    if writer and (not resuming or not cons_path.exists()):
        write_volume(cons_path, vol, ps.apix)
    key = cfg.key() | {"particles": str(Path(a.particles).resolve()), "n_particles": len(ps),
                       "mask": file_digest(a.mask), "volume": file_digest(a.volume) if a.volume else "reconstructed"}
    va = VA3D(ps, mask, vol, cfg)
    say(f"3dva: {len(ps)} particles, box {ps.box} at {ps.apix:.3f} Å/px, working box {va.m} "
        f"({va.apix_m:.3f} Å/px), K={cfg.k}, filter {cfg.filter_res} Å, device {dev}"
        + (f", {world} processes (about {-(-len(ps) // world)} particles each)" if world > 1 else ""))
    if resuming:
        va.restore(ckpt, key)
        say(f"3dva: continuing from iteration {va.iteration} ({ckpt})")
    final = run_loop(va, cfg.iterations, ckpt, key)
    res = va.result(final)
    floor = None
    if a.noise_floor:
        floor = _noise_floor(ps, mask, vol, cfg, out, key)
    if not writer:
        return
    run = write_run_outputs(out, ps, res, vol, a, cfg, floor=floor, seconds=time.time() - t0,
                            objective_final=final["objective"])
    from ..engine.cryosparc_cs import write_cs_latents_beside
    write_cs_latents_beside(ps.star_path, ps.ids, res.latents, out)  # latents.cs for a cryoSPARC .cs input
    from ..engine.va3d.em import dump_json
    dump_json(out / "run.json", run | {"world_size": world, "particles_per_rank": -(-len(ps) // world)})
    ev = ", ".join(f"{v:.4g}" for v in res.eigenvalues)
    pf = ", ".join(f"{100 * v:.2f}%" for v in res.power_fraction)
    print(f"3dva: component variances [{ev}], residual power explained [{pf}]"
          + (f"; noise floor {floor['floor_eigenvalue']:.4g}" if floor else ""), flush=True)
    print(f"3dva: done in {time.time() - t0:.0f} s; outputs in {out}", flush=True)


def _check_checkpoint(path: Path) -> None:
    """--continue: the checkpoint must be a readable 3DVA one (not truncated, not 3D Flex's), before any work."""
    from ..engine.errors import InputError
    from ..engine.torchfile import describe, load_torch_file
    hint = ("delete it to start this run again from the beginning, or start a new run in another folder "
            "(checkpoints are written after every iteration, so only the last one is kept)")
    what = describe(load_torch_file(path, "a 3DVA checkpoint", hint))
    if what != "a 3DVA checkpoint (checkpoint.pt of 3dva)":
        raise InputError(f"cannot continue from {path}: it is {what}, not a 3DVA checkpoint; {hint}")


def _noise_floor(ps, mask, vol, cfg, out: Path, key: dict) -> dict:
    """The same EM on pose-shuffled data (see engine/va3d/em.py); returns its explained variances."""
    from ..engine.va3d.em import VA3D, run_loop
    perm = np.random.default_rng(cfg.seed + 1).permutation(len(ps))
    nva = VA3D(ps, mask, vol, cfg, null_permutation=perm)
    ck = out / "checkpoint_null.pt"
    nkey = key | {"null": True}
    if ck.exists():
        _check_checkpoint(ck)
        nva.restore(ck, nkey)
    from ..engine.distributed import say
    say("3dva: noise floor: the same analysis on pose-shuffled particles")
    fin = run_loop(nva, cfg.iterations, ck, nkey, label="3dva null")
    r = nva.result(fin)
    return {"eigenvalues": r.eigenvalues.tolist(), "power_fraction": r.power_fraction.tolist(),
            "latent_variance": r.latent_variance.tolist(),
            "floor_eigenvalue": float(r.eigenvalues.max()), "floor_power_fraction": float(r.power_fraction.max())}
