"""3D Flex generation: volumes at latent points, series along latent axes, and the latent atlas.

A trained model (model.pt from flex-train) is self-describing: settings, mesh, generator weights,
canonical map and per-particle latents with their ids. A volume at latent point z is the canonical map
convected by the flow decoded from z (W(x) = V(x + u_z(x)), model.py), at the training box or at a
finer box (the canonical map Fourier-padded, or a high-resolution map given by the caller, and the flow
re-rasterised from the mesh on the finer grid).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..fourier import irfft3c, rfft3c
from ..identity import check_same_particles
from ..torchfile import describe, load_torch_file
from .generate_config import GenerateConfig
from .mesh import Mesh, mesh_from_dict
from .model import FlowGenerator, MeshRaster, warp_volume

__all__ = ["FlexModel", "available_bytes", "axis_series", "check_generation_memory", "check_model_particles",
           "check_points_range", "estimate_generation_bytes", "fourier_pad_3d", "load_model", "points_from_particles",
           "read_points"]


def fourier_pad_3d(vol: torch.Tensor, m: int) -> torch.Tensor:
    """Upsample a volume (N³ → m³) by zero-padding its spectrum; real-space values are preserved."""
    n = vol.shape[-1]
    if m == n:
        return vol
    ft = rfft3c(vol)
    out = torch.zeros(m, m, m // 2 + 1, dtype=ft.dtype, device=ft.device)
    lo = m // 2 - n // 2
    out[lo:lo + n, lo:lo + n, : n // 2 + 1] = ft
    return irfft3c(out, m) * (m ** 3) / (n ** 3)


@dataclass
class FlexModel:
    """What generation and the high-resolution reconstruction need from a trained model."""

    gen: FlowGenerator
    mesh: Mesh
    canonical: torch.Tensor  # training box
    apix_train: float
    train_box: int
    crop: int
    box: int
    apix: float
    latents: np.ndarray
    ids: np.ndarray
    config: dict
    device: torch.device
    particles: dict | None = None  # identity.particle_record of the training particles (models since 2026-11)

    @property
    def k(self) -> int:
        return self.latents.shape[1]

    def _rasters(self) -> dict[int, MeshRaster]:
        if not hasattr(self, "_rcache"):
            self._rcache: dict[int, MeshRaster] = {}
        return self._rcache

    def raster(self, m: int) -> MeshRaster:
        r = self._rasters()
        if m not in r:
            r[m] = MeshRaster(self.mesh, m, self.device)
        return r[m]

    def support_radius(self, m: int, margin: float = 0.1) -> float:
        """Radius (voxels of box m) that can hold density: the mesh mask's extent plus a motion margin."""
        n = self.mesh.N
        zz, yy, xx = np.nonzero(self.mesh.mask)
        if len(zz) == 0:
            return m / 2
        r = np.sqrt((xx - n // 2) ** 2 + (yy - n // 2) ** 2 + (zz - n // 2) ** 2).max()
        return float((r + margin * n) * m / n)

    def apix_at(self, m: int) -> float:
        """Pixel size of a box m spanning the crop box's extent."""
        return self.apix_train * self.train_box / m

    @torch.no_grad()
    def mean_displacement(self, batch: int = 4096) -> torch.Tensor:
        """The particles' mean vertex displacement (V, 3) in Å: the deformation common to all particles.

        3D Flex fixes its canonical map only up to such a common deformation, and trained models carry one (up
        to 1.3 voxels in flex-reconstruct's measurements). A map of all the particles - the consensus, or the
        flex map, which flex-reconstruct solves in this frame - sits at the particles' mean, not at the model's
        canonical frame; generation from such a map takes it out of every flow (`volumes`)."""
        if not hasattr(self, "_mean_d"):
            z = torch.as_tensor(self.latents, dtype=torch.float32, device=self.device)
            total = sum(self.gen(z[s:s + batch]).double().sum(0) for s in range(0, len(z), batch))
            self._mean_d = (total / max(1, len(z))).float()
        return self._mean_d

    @torch.no_grad()
    def flow(self, z: torch.Tensor, m: int, mean_frame: bool = False) -> torch.Tensor:
        """Flow (B, m, m, m, 3) in voxels of box m for latent points z (B, K); `mean_frame`: relative to the
        particles' mean deformation (for maps in that frame, see mean_displacement)."""
        d = self.gen(z.to(self.device, torch.float32))
        if mean_frame:
            d = d - self.mean_displacement()
        return self.raster(m).flow(d, self.apix_at(m))

    @torch.no_grad()
    def volumes(self, points: np.ndarray, m: int | None = None, canonical: torch.Tensor | None = None,
                batch: int = 4, mean_frame: bool | None = None) -> np.ndarray:
        """Convected maps (P, m, m, m) at latent points (P, K); m defaults to the training box.

        A `canonical` map given by the caller (flex_map.mrc, a consensus) is a map of all the particles, so by
        default it is taken to be in their mean frame (`mean_frame`, see mean_displacement); the model's own
        canonical map is in the model's frame."""
        mean_frame = canonical is not None if mean_frame is None else mean_frame
        points = np.atleast_2d(np.asarray(points, dtype=np.float32))
        if points.shape[1] != self.k:
            raise InputError(f"latent points have {points.shape[1]} values, the model has K={self.k}")
        m = m or self.train_box
        if m % 2 or m < 16:
            raise InputError(f"output box must be even and >= 16, got {m}")
        v = canonical if canonical is not None else fourier_pad_3d(self.canonical, m) if m > self.train_box else \
            self.canonical if m == self.train_box else None
        if v is None:
            from ..fourier import fourier_crop_3d
            v = fourier_crop_3d(self.canonical, m)
        if v.shape[-1] != m:
            raise InputError(f"the map given for generation is {v.shape[-1]} px, expected {m}")
        out = []
        for s in range(0, len(points), batch):
            z = torch.as_tensor(points[s:s + batch])
            out.append(warp_volume(v.to(self.device), self.flow(z, m, mean_frame)).cpu().numpy())
        return np.concatenate(out)


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> FlexModel:
    """Read model.pt (or a training folder holding it)."""
    p = str(path)
    if os.path.isdir(p):
        p = os.path.join(p, "model.pt")
    if not os.path.exists(p):
        raise InputError(f"3D Flex model not found: {p} (run flex-train first)")
    hint = ("give the model.pt that flex-train writes when it finishes (or its folder); if this one is damaged, "
            "rerun flex-train with --continue in its folder (the last checkpoint is kept) or train afresh")
    d = load_torch_file(p, "a 3D Flex model (model.pt of flex-train)", hint)
    what = describe(d)
    if what != "a 3D Flex model (model.pt of flex-train)" or "mesh_pickle" not in d:
        if "training checkpoint" in what:
            hint = ("the training has not finished: rerun flex-train with --continue in its folder, then give the "
                    "model.pt it writes")
        raise InputError(f"{p} is {what}, not a finished 3D Flex model (model.pt); {hint}")
    try:
        mesh = mesh_from_dict(pickle.loads(d["mesh_pickle"]), p)
        cfg = d["config"]
        dev = torch.device(device)
        gen = FlowGenerator(cfg["k"], len(mesh.points), cfg["layers"], cfg["hidden"]).to(dev)
        gen.load_state_dict(d["generator"])
        gen.eval()
        spec = d["spec"]
        canonical = (d["density"] * d["mask"] * d["v_scale"]).to(dev)
        return FlexModel(gen, mesh, canonical, spec["apix"] * spec["crop"] / spec["train"], spec["train"],
                         spec["crop"], spec["box"], spec["apix"], d["latents"].numpy(), d["ids"].numpy(), cfg, dev,
                         d.get("particles"))
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001  (missing entries, tensors of the wrong size: a damaged model)
        raise InputError(f"{p} is a damaged 3D Flex model ({type(e).__name__}: {str(e)[:200]}); {hint}") from None


def check_model_particles(model: FlexModel, ps, source: str) -> None:
    """Particles given with a model (flex-reconstruct) must be the training's own under each shared id, not
    another data set numbered alike: InputError otherwise (engine/identity.py). Older models lack the record."""
    if model.particles is not None:
        check_same_particles(model.ids, model.particles, ps, source, "the model's training particles")


def estimate_generation_bytes(model: FlexModel, m: int, volumes: int, batch: int = 4) -> int:
    """Peak memory (bytes) of generating `volumes` maps at box m: the returned maps, one batch's flow, sampling
    grid and output, the mesh raster at box m and the padded canonical map (float32). Measured peaks: 1.01 GB for
    5 maps at box 160 (estimate 1.07 GB); the raster 600 bytes per voxel of the mesh's mask at box 128."""
    vox = m ** 3
    mesh_vox = vox * float(np.mean(model.mesh.mask)) if model.mesh.mask is not None else vox
    per_batch = 4 * vox * (3 + 3 + 3 + 3 + 1) * min(batch, volumes)  # u, base+u, grid, expand/copy, out
    raster = 600 * mesh_vox  # indices, barycentric weights, sparse matrix, positions (cells cover 1.6x the mask)
    canonical = 24 * vox  # Fourier padding: complex spectrum and the real map
    return int(4 * vox * volumes + per_batch + raster + canonical)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for a job now: MemAvailable (and a cgroup limit) on the CPU, the free GPU memory on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read())
        if limit != "max":
            free = int(limit) - used
            avail = free if avail is None else min(avail, free)
    except (OSError, ValueError):
        pass
    return avail


def check_generation_memory(model: FlexModel, m: int, volumes: int, device: torch.device | str = "cpu") -> int:
    """Refuse (InputError) a generation whose estimated peak memory exceeds what is free; returns the estimate."""
    need = estimate_generation_bytes(model, m, volumes)
    have = available_bytes(device)
    if have is not None and need > have:
        fit = m
        while fit > 16 and estimate_generation_bytes(model, fit, volumes) > have:
            fit -= 2
        raise InputError(f"--box {m}: generating {volumes} volumes of {m}³ voxels needs about {need / 2**30:.1f} GiB "
                         f"of memory, but {have / 2**30:.1f} GiB are free on {torch.device(device)}; use a smaller "
                         f"--box (about {fit} fits), fewer --frames, or a machine with more memory")
    return need


LATENT_EDGE = 1.5  # flex-train's latent prior keeps latents within about ±1.5 (--latent-prior)


def check_points_range(points: np.ndarray, latents: np.ndarray, source: str, log=print) -> None:
    """Points far outside the particles' latent range decode to meaningless maps: more than one range width
    (at least LATENT_EDGE) beyond it on any axis is an InputError; outside the range (extrapolation) a WARNING
    line. The floor keeps a collapsed latent (a tiny range) from refusing points near it."""
    lo, hi = latents.min(0), latents.max(0)
    width = np.maximum(hi - lo, LATENT_EDGE)
    far = (points < lo - width) | (points > hi + width)
    if far.any():
        i, k = np.argwhere(far)[0]
        raise InputError(f"{source}: point {i} (0-based) has latent {k} = {points[i, k]:g}, far outside the "
                         f"particles' range [{lo[k]:.3g}, {hi[k]:.3g}] (at most {width[k]:.3g} beyond it is "
                         "accepted); give points inside the range the particles occupy")
    out = (points < lo) | (points > hi)
    if out.any():
        log(f"WARNING: {int(out.any(1).sum())} of {len(points)} points lie outside the particles' latent range "
            f"({', '.join(f'z{k} [{lo[k]:.3g}, {hi[k]:.3g}]' for k in range(len(lo)))}): their maps are "
            "extrapolated")


def axis_series(latents: np.ndarray, frames: int = GenerateConfig.frames,
                percentile: float = GenerateConfig.percentile) -> list[np.ndarray]:
    """Per latent axis k, `frames` points along k over the range the particles occupy ([p, 100−p] %),
    the other coordinates at their median; an odd count puts the middle frame at the centre of the range."""
    if frames < 2:
        raise InputError("--frames must be at least 2")
    z = np.asarray(latents, dtype=np.float64)
    med = np.median(z, 0)
    out = []
    for k in range(z.shape[1]):
        lo, hi = np.percentile(z[:, k], [percentile, 100 - percentile])
        pts = np.tile(med, (frames, 1))
        pts[:, k] = np.linspace(lo, hi, frames)
        out.append(pts.astype(np.float32))
    return out


def read_points(path: str | os.PathLike, k: int) -> np.ndarray:
    """Latent points from a CSV: one point per row, K comma-separated values, no header."""
    if not os.path.exists(path):
        raise InputError(f"points file not found: {path}")
    try:
        pts = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise InputError(f"{path}: expected rows of {k} comma-separated numbers, no header ({e})") from None
    if pts.shape[1] != k:
        raise InputError(f"{path}: rows have {pts.shape[1]} values but the model has K={k}")
    if not np.isfinite(pts).all():
        raise InputError(f"{path}: points must be finite numbers")
    return pts.astype(np.float32)


def points_from_particles(model: FlexModel, ids: list[int]) -> np.ndarray:
    """The mean latent (1, K) of the particles with these ids."""
    index = {int(i): r for r, i in enumerate(model.ids)}
    missing = [i for i in ids if i not in index]
    if missing:
        raise InputError(f"particle ids {missing[:5]} are not in the model")
    return model.latents[[index[i] for i in ids]].mean(0, keepdims=True).astype(np.float32)
