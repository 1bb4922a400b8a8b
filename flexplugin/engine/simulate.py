"""Built-in example data: a flexible three-domain object, imaged like real particles.

The object is made of pseudo-atoms (isotropic Gaussians) laid out as bundles of pseudo-α-helices in three
domains: a fixed core, an arm that swings about a hinge on the core, and a head on the arm that also
twists about the arm's axis. A motion coordinate t ∈ [-1, 1] drives both motions (hinge = t·hinge_deg,
twist = t·twist_deg). Each particle draws t, a uniformly random 3-D orientation, an origin shift, and
an astigmatic CTF, then gets white Gaussian noise at the requested SNR (signal variance / noise variance).

Images are *not* made with our Fourier projector: each Gaussian's line integral is written analytically
(a 2-D Gaussian of the same width centred at the projected atom, √(2π)σ·amplitude), so tests of the
projector and the reconstructor against these data are not an inverse crime. Volumes are the same
Gaussians sampled on the voxel grid, so both share units (projection = Σ voxels along z).

Any other `MotionModel` (atom positions for t) is imaged the same way: `simulate_dataset(..., motion=...)`, e.g.
real proteins and their motions from `pdb_motion`. Every data set also gets gt/moving_mask.mrc, a soft mask of
the atoms that really move, where flexibility is scored.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from .atomic import to_csv, write_json
from .ctf import CTFParams, compute_ctf
from .errors import InputError
from .fourier import irfft2c, lowpass_volume, rfft2c
from .geometry import euler_to_matrix
from .io import write_particles_star, write_volume
from .simulate_config import SimConfig  # torch-free, beside options.py: the CLI and protocols read it

__all__ = [
    "FlexibleObject",
    "MotionModel",
    "SimConfig",
    "build_object",
    "moving_atoms",
    "moving_mask",
    "project_atoms",
    "render_atoms",
    "render_volumes",
    "simulate_dataset",
    "soft_mask_from_volumes",
]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _axis_angle(axis: np.ndarray, angle_rad: np.ndarray) -> np.ndarray:
    """Rotation matrices (B, 3, 3) about a unit axis by angles (B,) (Rodrigues)."""
    k = axis / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.asarray(angle_rad)[..., None, None]
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * (K @ K)


def _helix_bundle(rng: np.random.Generator, center: np.ndarray, radii: np.ndarray, n_helices: int,
                  length_A: float) -> np.ndarray:
    """Pseudo-α-helices (radius 2.3 Å, 1.5 Å rise, 3.6 atoms/turn) packed in an ellipsoid."""
    atoms = []
    n_per = int(length_A / 1.5)
    main_dir = rng.normal(size=3)
    main_dir /= np.linalg.norm(main_dir)
    for _ in range(n_helices):
        d = main_dir + 0.35 * rng.normal(size=3)
        d /= np.linalg.norm(d)
        u = np.cross(d, [1.0, 0, 0] if abs(d[0]) < 0.9 else [0, 1.0, 0])
        u /= np.linalg.norm(u)
        v = np.cross(d, u)
        start = center + rng.uniform(-0.6, 0.6, 3) * radii - d * length_A / 2
        i = np.arange(n_per)
        phi = 2 * np.pi * i / 3.6
        pts = start + np.outer(i * 1.5, d) + 2.3 * (np.outer(np.cos(phi), u) + np.outer(np.sin(phi), v))
        inside = (((pts - center) / radii) ** 2).sum(1) <= 1.0
        atoms.append(pts[inside])
    return np.concatenate(atoms, 0)


class MotionModel(Protocol):
    """Anything the simulator can image: atom positions (B, n_atoms, 3) in Å, origin at the box centre, for t (B,)."""

    @property
    def n_atoms(self) -> int: ...

    def atoms(self, t: np.ndarray) -> np.ndarray: ...


@dataclass
class FlexibleObject:
    """Pseudo-atoms per domain (Å, origin at the box centre) and the motion's axes and pivots."""

    core: np.ndarray
    arm: np.ndarray
    head: np.ndarray
    hinge_point: np.ndarray
    hinge_axis: np.ndarray
    twist_axis: np.ndarray
    hinge_deg: float
    twist_deg: float

    @property
    def n_atoms(self) -> int:
        return len(self.core) + len(self.arm) + len(self.head)

    def atoms(self, t: np.ndarray) -> np.ndarray:
        """Atom positions (B, n_atoms, 3) in Å for motion coordinates t (B,)."""
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        Rh = _axis_angle(self.hinge_axis, np.deg2rad(self.hinge_deg) * t)  # (B,3,3)
        Rt = _axis_angle(self.twist_axis, np.deg2rad(self.twist_deg) * t)
        p = self.hinge_point
        arm = np.einsum("bij,aj->bai", Rh, self.arm - p) + p
        head_local = np.einsum("bij,aj->bai", Rt, self.head - p)  # twist about the arm axis through p
        head = np.einsum("bij,baj->bai", Rh, head_local) + p
        core = np.broadcast_to(self.core, (len(t),) + self.core.shape)
        return np.concatenate([core, arm, head], 1)


def build_object(cfg: SimConfig) -> FlexibleObject:
    """The three-domain object scaled to fit ~70 % of the box (deterministic by seed)."""
    rng = np.random.default_rng(cfg.seed + 7919)
    L = cfg.box * cfg.apix  # box extent in Å
    s = L / 128.0  # designed for a 128 Å box, scaled to the box
    core_c, arm_c, head_c = np.array([-14.0, -6, 0]) * s, np.array([12.0, 4, 0]) * s, np.array([24.0, 20, 0]) * s
    core = _helix_bundle(rng, core_c, np.array([20.0, 15, 15]) * s, 60, 40 * s)
    arm = _helix_bundle(rng, arm_c, np.array([13.0, 8, 9]) * s, 24, 30 * s)
    head = _helix_bundle(rng, head_c, np.array([9.0, 9, 9]) * s, 18, 22 * s)
    hinge_point = np.array([2.0, -2, 0]) * s
    twist_axis = (head_c - hinge_point) / np.linalg.norm(head_c - hinge_point)
    return FlexibleObject(core, arm, head, hinge_point, np.array([0.0, 0, 1]), twist_axis,
                          cfg.hinge_deg, cfg.twist_deg)


def _gauss_1d(coords_px: torch.Tensor, grid: torch.Tensor, sigma_px: float) -> torch.Tensor:
    return torch.exp(-(grid - coords_px[..., None]) ** 2 / (2 * sigma_px ** 2))


def render_atoms(positions: np.ndarray, box: int, apix: float, sigma_A: float) -> np.ndarray:
    """Volumes (B, box, box, box) [z, y, x] of atom sets (B, n, 3) Å: Gaussians sampled on the voxel grid."""
    g = torch.arange(box, dtype=torch.float64) - box // 2
    sig = sigma_A / apix
    out = []
    for pos in positions:
        p = torch.as_tensor(pos / apix)
        gx, gy, gz = (_gauss_1d(p[:, i], g, sig) for i in range(3))
        yx = (gy[:, :, None] * gx[:, None, :]).reshape(len(p), -1)
        out.append((gz.T @ yx).reshape(box, box, box).float().numpy())
    return np.stack(out)


def render_volumes(obj: MotionModel, t: np.ndarray, box: int, apix: float, sigma_A: float) -> np.ndarray:
    """Ground-truth volumes (len(t), box, box, box) [z, y, x] of a motion model at coordinates t."""
    return render_atoms(obj.atoms(t), box, apix, sigma_A)


def project_atoms(atoms_A: np.ndarray, A: np.ndarray, shifts_px: np.ndarray, box: int, apix: float,
                  sigma_A: float) -> torch.Tensor:
    """Analytic projections (B, box, box): Σ_atoms √(2π)σ·G_σ(x − (A c)_xy + s), in voxel units.

    `shifts_px` are RELION origins: the particle's content sits at −origin in the image."""
    g = torch.arange(box, dtype=torch.float64) - box // 2
    sig = sigma_A / apix
    c = torch.as_tensor(atoms_A / apix)  # (B, n, 3) px
    p = torch.einsum("bij,bnj->bni", torch.as_tensor(A), c)
    px = p[..., 0] - torch.as_tensor(shifts_px[:, 0:1])
    py = p[..., 1] - torch.as_tensor(shifts_px[:, 1:2])
    gx, gy = _gauss_1d(px, g, sig), _gauss_1d(py, g, sig)  # (B, n, box)
    return (math.sqrt(2 * math.pi) * sig) * torch.einsum("bny,bnx->byx", gy, gx)


def soft_mask_from_volumes(vols: np.ndarray, apix: float, lowpass_A: float = 15.0, threshold: float = 0.1,
                           dilate_px: int = 2, soft_px: int = 4) -> np.ndarray:
    """Soft mask covering every state: low-pass, threshold at a fraction of the max, dilate, cosine edge."""
    from scipy import ndimage
    env = np.max(vols, 0)
    lp = lowpass_volume(torch.as_tensor(env), lowpass_A, apix, order=4).numpy()
    hard = lp > threshold * lp.max()
    hard = ndimage.binary_dilation(hard, iterations=dilate_px)
    dist = ndimage.distance_transform_edt(~hard)
    soft = np.where(hard, 1.0, np.where(dist <= soft_px, 0.5 * (1 + np.cos(np.pi * dist / soft_px)), 0.0))
    return soft.astype(np.float32)


def moving_atoms(obj: MotionModel, fraction: float = 0.25) -> np.ndarray:
    """Boolean (n_atoms,): atoms displaced between t = -1 and t = +1 by more than `fraction` of the largest move."""
    ends = obj.atoms(np.array([-1.0, 1.0]))
    d = np.linalg.norm(ends[1] - ends[0], axis=1)
    return d > fraction * d.max() if d.max() > 0 else np.zeros(len(d), dtype=bool)


def moving_mask(obj: MotionModel, states_t: np.ndarray, box: int, apix: float, sigma_A: float,
                fraction: float = 0.25) -> np.ndarray:
    """Soft mask of the moving atoms over the states (as `soft_mask_from_volumes`): where flexibility is scored."""
    sel = moving_atoms(obj, fraction)
    if not sel.any():
        return np.zeros((box, box, box), np.float32)
    return soft_mask_from_volumes(render_atoms(obj.atoms(states_t)[:, sel], box, apix, sigma_A), apix)


def simulate_dataset(cfg: SimConfig, out: str | os.PathLike, progress: Callable[[str], None] = print,
                     motion: MotionModel | None = None, dataset: dict[str, Any] | None = None) -> dict:
    """Write particles.star + stacks, consensus.mrc, mask.mrc, gt/ states (+ moving_mask.mrc) and ground_truth.csv.

    `motion` images any motion model instead of the built-in three-domain object (`build_object(cfg)`);
    `dataset` (name, description, sources …) is recorded in simulation.json."""
    if cfg.n < 2 or cfg.box < 16 or cfg.box % 2 or cfg.apix <= 0 or cfg.snr <= 0 or cfg.stack_size < 1:
        raise InputError("need n >= 2, an even box >= 16, apix > 0, snr > 0 and stack size >= 1")
    if cfg.noise_seed is not None and cfg.noise_seed < 0:
        raise InputError(f"--noise-seed must be >= 0, got {cfg.noise_seed}")
    out = Path(out)
    (out / "stacks").mkdir(parents=True, exist_ok=True)
    (out / "gt").mkdir(exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    obj = build_object(cfg) if motion is None else motion
    n, box = cfg.n, cfg.box

    t = rng.uniform(-1.0, 1.0, n)
    Rs = np.stack([_random_rotation(rng) for _ in range(n)])
    # RELION angles of these matrices (uniform on SO(3)); recompute A from angles for exactness
    from .geometry import matrix_to_euler_np
    rot, tilt, psi = matrix_to_euler_np(Rs)
    A = euler_to_matrix(torch.as_tensor(rot), torch.as_tensor(tilt), torch.as_tensor(psi)).numpy()
    shifts = rng.uniform(-cfg.max_shift_px, cfg.max_shift_px, (n, 2))
    du = rng.uniform(cfg.defocus_min, cfg.defocus_max, n)
    dv = du - rng.uniform(0, 500, n)
    dang = rng.uniform(0, 180, n)
    half = np.where(rng.permutation(n) < n // 2, 1, 2)
    ctf_all = CTFParams(*(torch.as_tensor(x, dtype=torch.float32) for x in
                          (du, dv, dang, np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1), np.zeros(n),
                           np.full(n, cfg.bfactor))))

    # noise level from the mean signal variance over a pilot batch (fixed by the seed)
    clean = []
    batch = 128
    for s in range(0, n, batch):
        sl = slice(s, min(n, s + batch))
        proj = project_atoms(obj.atoms(t[sl]), A[sl], shifts[sl], box, cfg.apix, cfg.atom_sigma_A).float()
        ctf = compute_ctf(ctf_all[sl], box, cfg.apix)
        clean.append(irfft2c(rfft2c(proj) * ctf, box).numpy())
    clean = np.concatenate(clean)
    sig_var = float(clean.var(axis=(1, 2)).mean())
    noise_sd = math.sqrt(sig_var / cfg.snr)
    # the noise is the last draw, so a noise seed of its own changes nothing else (noise replicates)
    noise_rng = rng if cfg.noise_seed is None else np.random.default_rng(cfg.noise_seed)
    images = clean + noise_rng.normal(0, noise_sd, clean.shape).astype(np.float32)

    names = []
    n_stacks = math.ceil(n / cfg.stack_size)
    for k in range(n_stacks):
        lo, hi = k * cfg.stack_size, min(n, (k + 1) * cfg.stack_size)
        fname = f"stacks/particles_{k:03d}.mrcs"
        write_volume(out / fname, images[lo:hi], cfg.apix)
        names += [f"{i + 1:06d}@{fname}" for i in range(hi - lo)]
    progress(f"simulate: {n} particles written to {n_stacks} stack(s), noise sd {noise_sd:.4g}")

    ids = np.arange(1, n + 1)
    optics = pd.DataFrame([{"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1",
                            "rlnAmplitudeContrast": 0.1, "rlnSphericalAberration": 2.7, "rlnVoltage": 300.0,
                            "rlnImagePixelSize": cfg.apix, "rlnImageSize": box, "rlnImageDimensionality": 2,
                            "rlnCtfDataArePhaseFlipped": 0}])
    parts = pd.DataFrame({
        "rlnImageName": names, "rlnImageId": ids, "rlnAngleRot": rot, "rlnAngleTilt": tilt,
        "rlnAnglePsi": psi, "rlnOriginXAngst": shifts[:, 0] * cfg.apix, "rlnOriginYAngst": shifts[:, 1] * cfg.apix,
        "rlnDefocusU": du, "rlnDefocusV": dv, "rlnDefocusAngle": dang, "rlnPhaseShift": np.zeros(n),
        "rlnCtfBfactor": np.full(n, cfg.bfactor), "rlnOpticsGroup": np.ones(n, dtype=int), "rlnRandomSubset": half,
    })
    write_particles_star(out / "particles.star", parts, optics)
    to_csv(pd.DataFrame({"rlnImageId": ids, "motion": t}), out / "ground_truth.csv", index=False)

    states_t = np.linspace(-1, 1, cfg.n_states)
    states = render_volumes(obj, states_t, box, cfg.apix, cfg.atom_sigma_A)
    for i, v in enumerate(states):
        write_volume(out / "gt" / f"state_{i:03d}.mrc", v, cfg.apix)
    to_csv(pd.DataFrame({"state": np.arange(cfg.n_states), "motion": states_t}), out / "gt" / "states.csv",
           index=False)
    # consensus: the average over the motion distribution (uniform t), as a perfect refinement would see
    consensus = render_volumes(obj, np.linspace(-1, 1, 21), box, cfg.apix, cfg.atom_sigma_A).mean(0)
    write_volume(out / "consensus.mrc", consensus, cfg.apix)
    write_volume(out / "mask.mrc", soft_mask_from_volumes(states, cfg.apix), cfg.apix)
    write_volume(out / "gt" / "moving_mask.mrc", moving_mask(obj, states_t, box, cfg.apix, cfg.atom_sigma_A),
                 cfg.apix)
    meta = {"config": asdict(cfg), "n_atoms": obj.n_atoms, "noise_sd": noise_sd, "signal_var": sig_var,
            "files": {"particles": "particles.star", "consensus": "consensus.mrc", "mask": "mask.mrc",
                      "ground_truth": "ground_truth.csv", "states": "gt/states.csv",
                      "moving_mask": "gt/moving_mask.mrc"}}
    if dataset:
        meta["dataset"] = dict(dataset)
    write_json(out / "simulation.json", meta)
    progress(f"simulate: consensus, mask and {cfg.n_states} ground-truth states written to {out}")
    return meta
