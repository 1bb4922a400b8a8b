"""3D Flex training: flow generator, canonical map and per-particle latents learned jointly.

Per batch: z_i + ε (ε ~ N(0, noise_std²)) → FlowGenerator → vertex displacements → per-voxel flow on the
current working box → splatted projection of the convected canonical map at the particle's pose (model.py)
→ × scale × shift phase × CTF in Fourier space → whitened squared error up to the current resolution k_max.
Every term is per particle (batch mean): the data χ²/2, the rigidity λ_rig · (volume-weighted mean over the
mesh cells of w_j ‖FᵀF − I‖², estimated from a random subset of cells), the latent centring λ_c Σ_k |z_k|^p;
plus a weak L2 on the map. Latents are an auto-decoder table (no encoder) updated by their own per-row Adam,
clamped to ±1.5 like cryoSPARC's, and re-estimated by a latent search (search.py) at the start of every epoch
from `search_start` on and once more after the last. docs/flex_training.md explains and measures the choices.

Resolution marching: epoch e trains at k_max(e), rising linearly from 40 % to 80 % of the training Nyquist
over the base epochs; images and the canonical map are Fourier-cropped to the smallest box that holds k_max,
so early epochs cost a fraction of late ones. Flow LR anneals geometrically 0.005 → 0.0005, density LR stays
0.01 (cryoSPARC's defaults).

Determinism and resume: the batch order and noise of epoch e depend only on (seed, e), and a search only on
the state before it; a checkpoint holds everything else, so `resume` after epoch j gives the same result as an
uninterrupted run.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..atomic import torch_save
from ..ctf import compute_ctf
from ..distributed import all_reduce_, all_reduce_flat_, is_main, rank, shard, world
from ..errors import InputError
from ..fourier import fourier_crop_3d, freq_grid_2d, rfft2c, shift_phase_2d
from ..progress import Progress
from .config import TrainConfig
from .loading import LOADER_WORKERS
from .mesh import Mesh
from .model import (
    FlowGenerator,
    MeshRaster,
    deformation_gradients,
    project_warped_splat,
    rigidity_penalty,
)
from .prep import PreparedParticles, PrepSpec
from .search import latent_grid, search_latents
from .seeding import LATENT_SD, normalize_init_latents

__all__ = ["LATENT_SD", "FlexTrainer", "TrainConfig", "keep_spread", "kmax_schedule", "normalize_init_latents",
           "working_box"]


def keep_spread(z: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """`z` rescaled about its mean by one factor so that its total spread (√Σ variances) is that of `before`.

    A posterior mean shrinks towards the middle where the data are weak (early in training, or from random
    latents, where it would otherwise collapse every latent onto the grid's centre); one common factor keeps
    the order and the relative variances of the axes, and the flow generator keeps the latent scale it was
    trained on. The centring prior and the per-visit steps still set that scale over the epochs."""
    mu = z.mean(0)
    sd_now, sd_before = z.var(0).sum().sqrt(), before.var(0).sum().sqrt()
    return (mu + (z - mu) * (sd_before / sd_now.clamp(min=1e-12))).clamp(-1.5, 1.5)


def kmax_schedule(cfg: TrainConfig, epoch: int) -> float:
    """k_max as a fraction of the training Nyquist for `epoch` (0-based)."""
    if cfg.epochs <= 1:
        return cfg.kmax_final
    f = min(1.0, epoch / (cfg.epochs - 1))
    return cfg.kmax_start + f * (cfg.kmax_final - cfg.kmax_start)


def working_box(train_box: int, kmax_frac: float) -> int:
    """Smallest even box ≤ training box whose Nyquist holds k_max (in training-box Fourier pixels) + 1."""
    r = kmax_frac * train_box / 2
    return int(min(train_box, 2 * math.ceil(r + 1.5)))


_MESH_ARRAYS = {"points_sha256": "vertex positions", "cells_sha256": "cells", "rweights_sha256": "rigidity weights",
                "mask_sha256": "mask"}


def mesh_fingerprint(mesh: Mesh) -> dict:
    """Sizes and a hash per array of a mesh, kept in checkpoints so that --continue can tell another mesh."""
    import hashlib

    arrays = {"points_sha256": np.asarray(mesh.points, np.float64), "cells_sha256": np.asarray(mesh.cells, np.int64),
              "rweights_sha256": np.asarray(mesh.rweights, np.float64),
              "mask_sha256": np.asarray(mesh.mask_soft, np.float32)}
    return {"vertices": len(mesh.points), "cells": len(mesh.cells),
            **{k: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16] for k, a in arrays.items()}}


def mesh_difference(old: dict | None, new: dict) -> str:
    """How mesh fingerprint `new` differs from a checkpoint's `old` ('' when equal or `old` is unknown)."""
    if not old or old == new:
        return ""
    counts = [f"{old[k]} {k} in the checkpoint, {new[k]} now" for k in ("vertices", "cells") if old.get(k) != new[k]]
    if counts:
        return "; ".join(counts)
    return (f"same {new['vertices']} vertices and {new['cells']} cells but other "
            + ", ".join(label for k, label in _MESH_ARRAYS.items() if old.get(k) != new[k]))


def _read_checkpoint(path: str | os.PathLike, device: torch.device) -> dict:
    """torch.load of a training checkpoint; a truncated, foreign or final-model file is an InputError."""
    hint = "delete it to train from the start, or start a new training with a new --out"
    try:
        d = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # noqa: BLE001  (zip, pickle, EOF errors: all mean an unreadable file)
        why = (str(e).splitlines() or [""])[0].split(". ")[0][:200]
        raise InputError(f"cannot read the checkpoint {path} ({type(e).__name__}: {why}): the file is truncated "
                         f"or not a torch file; {hint}") from None
    if not isinstance(d, dict) or d.get("format") != "flexplugin-flex-model":
        raise InputError(f"{path} is not a flexplugin 3D Flex checkpoint; {hint}")
    if any(k not in d for k in ("opt_flow", "opt_density", "opt_latent")):
        raise InputError(f"{path} is a finished model (model.pt), not a training checkpoint: it has no optimiser "
                         f"state to continue from; {hint}")
    return d


def _quiet(_line: str) -> None:
    """The progress stream of ranks other than 0."""


class RowAdam:
    """Adam on selected rows of a table (per-row step counts): the auto-decoder latents' optimiser."""

    def __init__(self, table: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.t, self.lr, self.b1, self.b2, self.eps = table, lr, betas[0], betas[1], eps
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table)
        self.step = torch.zeros(table.shape[0], dtype=torch.float32, device=table.device)

    def update(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        self.step[rows] += 1
        s = self.step[rows][:, None]
        self.m[rows] = self.b1 * self.m[rows] + (1 - self.b1) * grad
        self.v[rows] = self.b2 * self.v[rows] + (1 - self.b2) * grad * grad
        mh = self.m[rows] / (1 - self.b1 ** s)
        vh = self.v[rows] / (1 - self.b2 ** s)
        self.t[rows] = (self.t[rows] - self.lr * mh / (vh.sqrt() + self.eps)).clamp(-1.5, 1.5)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.m.copy_(d["m"])
        self.v.copy_(d["v"])
        self.step.copy_(d["step"])


@dataclass
class EpochStats:
    epoch: int
    kmax_frac: float
    box: int
    data: float
    rigidity: float
    prior: float
    seconds: float


class FlexTrainer:
    """Holds the model state; `fit` runs the epochs, checkpointing after each one to `out/checkpoint.pt`."""

    def __init__(self, particles: PreparedParticles, volume: torch.Tensor, mesh: Mesh, cfg: TrainConfig,
                 device: torch.device | str = "cpu", init_latents: np.ndarray | None = None):
        cfg.validate()
        # Latent step size: each particle's latent gets one (Adam, so roughly sign-like) step per epoch. From a
        # seed, small steps keep it: on the example data a 3DVA seed ends at |ρ| 0.94 with 0.01 but 0.87 with
        # 0.05; from random latents large steps are needed to find the motion (0.91 with 0.05, 0.59 with 0.01).
        self._lr_latent_auto = cfg.lr_latent is None
        # seeded latents are kept as a prior in every latent search (search.py): a seed is information that a
        # barely trained model must not overwrite; random latents search globally (no anchor)
        self.seeded = init_latents is not None
        if cfg.lr_latent is None:
            cfg.lr_latent = 0.01 if init_latents is not None else 0.05
        self.p, self.cfg, self.mesh = particles, cfg, mesh
        self.spec: PrepSpec = particles.spec
        self.dev = torch.device(device)
        t = self.spec.train
        if volume.shape[-1] != t:
            raise InputError(f"canonical volume box {volume.shape[-1]} differs from the training box {t}")
        extent_mesh, extent_data = mesh.N * mesh.psize_A, t * self.spec.apix_train
        if abs(extent_mesh - extent_data) > 0.02 * extent_data:
            raise InputError(f"the mesh spans {extent_mesh:.1f} Å but the training box spans {extent_data:.1f} Å; "
                             "build the mesh from the consensus map at the crop box")
        torch.manual_seed(cfg.seed)
        self.gen = FlowGenerator(cfg.k, len(mesh.points), cfg.layers, cfg.hidden).to(self.dev)
        soft = torch.as_tensor(mesh.mask_soft, dtype=torch.float32)
        self.mask_t = (fourier_crop_3d(soft, t) if soft.shape[-1] != t else soft).clamp(0, 1).to(self.dev)
        v = volume.to(self.dev, torch.float32)
        self.v_scale = float((v * self.mask_t).std().clamp(min=1e-12))
        self.density = torch.nn.Parameter(v / self.v_scale)
        n = len(particles)
        if init_latents is not None:
            if init_latents.shape != (n, cfg.k):
                raise InputError(f"initial latents have shape {init_latents.shape}, expected ({n}, {cfg.k})")
            z0 = torch.as_tensor(init_latents, dtype=torch.float32)
        else:
            g = torch.Generator().manual_seed(cfg.seed + 1)
            z0 = LATENT_SD * torch.randn(n, cfg.k, generator=g)
        self.latents = z0.to(self.dev).clone()
        self.opt_flow = torch.optim.Adam(self.gen.parameters(), lr=cfg.lr_flow_init)
        self.opt_density = torch.optim.Adam([self.density], lr=cfg.lr_density)
        self.opt_latent = RowAdam(self.latents, cfg.lr_latent)
        self.cells = torch.as_tensor(mesh.cells, device=self.dev)
        self.rest_inv = torch.linalg.inv(torch.as_tensor(mesh.rest_edges(), dtype=torch.float32)).to(self.dev)
        self.rweights = torch.as_tensor(mesh.rweights, dtype=torch.float32, device=self.dev)
        vol_cells = torch.as_tensor(np.abs(np.linalg.det(mesh.rest_edges())) / 6.0, dtype=torch.float32)
        # rigidity = Σ_j v_j w_j ρ_j / Σ_j v_j: a mean over the meshed volume, so λ keeps its meaning when the
        # mesh is refined or the mask grows (a sum over cells made it follow the cell count)
        self.rig_weights = (self.rweights * (vol_cells / vol_cells.sum()).to(self.dev))
        self.radius_A = self._support_radius()
        self.scale = 1.0
        self.noise_shell: torch.Tensor | None = None
        self.history: list[dict] = []
        self.searches: list[dict] = []
        self.final_search_done = False
        self.epoch = 0
        self.loader_workers = LOADER_WORKERS  # DataLoader processes preparing batches ahead (flex-train --workers)
        self._rasters: dict[int, MeshRaster] = {}

    # --- set-up -------------------------------------------------------------------------------------
    def _support_radius(self) -> float:
        """Radius (Å) around the centre that can hold density: mask extent plus a motion margin."""
        t = self.spec.train
        g = torch.arange(t, dtype=torch.float32) - t // 2
        zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
        r = torch.sqrt(xx ** 2 + yy ** 2 + zz ** 2)
        m = self.mask_t.cpu() > 1e-3
        rmax = float(r[m].max()) if m.any() else t / 2
        return (rmax + 0.1 * t) * self.spec.apix_train

    def raster(self, m: int) -> MeshRaster:
        if m not in self._rasters:
            self._rasters[m] = MeshRaster(self.mesh, m, self.dev)
        return self._rasters[m]

    def canonical(self, m: int | None = None) -> torch.Tensor:
        """The canonical map (masked) at the training box or Fourier-cropped to box m."""
        v = self.density * self.mask_t * self.v_scale
        t = self.spec.train
        return v if m is None or m == t else fourier_crop_3d(v, m)

    def _band(self, m: int, kmax_px: float):
        """Shell index per coefficient of box m (training-box Fourier pixels), band mask and rfft weights."""
        g = freq_grid_2d(m, self.dev) * m  # integer Fourier indices
        r = g.norm(dim=-1)
        shell = torch.round(r).long().clamp(max=self.spec.train // 2)
        band = (r <= kmax_px) & (r > 0)
        mult = torch.full_like(r, 2.0)
        mult[:, 0] = 1.0
        if m % 2 == 0:
            mult[:, -1] = 1.0
        return shell, band, mult

    def model_ft(self, batch: dict, m: int, d: torch.Tensor | None, vol_m: torch.Tensor) -> torch.Tensor:
        """Model spectra (B, m, m//2+1) on the training-box scale for displacements d (B, V, 3) or rigid."""
        t = self.spec.train
        apix_m = self.spec.apix_train * t / m
        r = self.raster(m)
        u = r.flow_vox(d, apix_m) if d is not None else None
        proj = project_warped_splat(vol_m, batch["rotations"], r.pos, u)
        ft = rfft2c(proj) * ((t / m) ** 3 * self.scale)
        ft = ft * shift_phase_2d(m, -batch["shifts"] * (m / t))  # RELION origin: content at −origin
        return ft * compute_ctf(batch["ctf"], m, apix_m, self.p.ps.phase_flipped)

    @staticmethod
    def crop_ft(ft: torch.Tensor, t: int, m: int) -> torch.Tensor:
        lo = t // 2 - m // 2
        return ft[..., lo:lo + m, : m // 2 + 1]

    @torch.no_grad()
    def estimate_noise(self, progress: Callable[[str], None] = print) -> None:
        """Scale between map and images and the per-shell noise power, from residuals of the rigid model."""
        t = self.spec.train
        rng = np.random.default_rng(self.cfg.seed + 17)
        n = len(self.p)
        rows = np.sort(rng.choice(n, size=min(n, self.cfg.noise_particles), replace=False))
        vol = self.canonical()
        num = den = 0.0
        res_pow = torch.zeros(t // 2 + 1, device=self.dev)
        cnt = torch.zeros(t // 2 + 1, device=self.dev)
        shell, band, mult = self._band(t, 0.5 * t / 2)
        mine = shard(rows)  # under torch.distributed each rank takes its share; the sums are added over ranks
        batches = [mine[i:i + self.cfg.batch_size] for i in range(0, len(mine), self.cfg.batch_size)]
        spectra = []
        for br in batches:
            b = self.p.batch(br, self.dev)
            y = rfft2c(b["images"])
            self.scale = 1.0
            mod = self.model_ft(b, t, None, vol)
            num += float((y.conj() * mod).real[:, band].sum())
            den += float(mod.abs().square()[:, band].sum())
            spectra.append((y, mod))
        num, den = all_reduce_(torch.tensor([num, den], dtype=torch.float64)).tolist()
        if den <= 0:
            raise InputError("the consensus map projects to zero: check the map and the mask")
        self.scale = num / den
        if self.scale <= 0:
            raise InputError("images anti-correlate with the consensus map: check the contrast convention "
                             "(protein must be bright, as RELION writes particles) or the map's hand")
        for y, mod in spectra:
            r2 = (y - self.scale * mod).abs().square()
            res_pow.index_add_(0, shell.flatten(), r2.sum(0).flatten())
            cnt.index_add_(0, shell.flatten(), torch.full_like(shell.flatten(), len(y), dtype=torch.float32))
        all_reduce_(res_pow)
        all_reduce_(cnt)
        self.noise_shell = (res_pow / cnt.clamp(min=1)).clamp(min=1e-12)
        progress(f"flex-train: map-to-image scale {self.scale:.4g}, noise power {self.noise_shell[1:].mean():.4g} "
                 f"(mean over shells), from {len(rows)} particles")

    # --- training -----------------------------------------------------------------------------------
    def _lr_flow(self, epoch: int) -> float:
        c = self.cfg
        f = min(1.0, epoch / max(1, c.epochs - 1))
        return c.lr_flow_init * (c.lr_flow_final / c.lr_flow_init) ** f

    def step(self, batch: dict, m: int, kmax_px: float, train: bool = True,
             n_global: int | None = None) -> tuple[float, float, float]:
        """One optimisation step on a batch; returns the batch sums of (data, rigidity, prior).

        Under torch.distributed `batch` is this rank's share (rows rank::world) of a global batch of
        `n_global` particles: the injected noise is drawn for the whole batch and shared out the same way, the
        loss is divided by the global count and the gradients are summed over the ranks, so every rank takes
        the step one process would take on the whole batch.
        """
        c, t = self.cfg, self.spec.train
        rows = batch["rows"]
        n_global = n_global or len(rows)
        z = self.latents[rows].clone().requires_grad_(train)
        g = torch.Generator(device="cpu").manual_seed(int(self._noise_seed))
        self._noise_seed += 1
        eps = (torch.randn(n_global, c.k, generator=g)[rank()::world()].to(self.dev) * c.latent_noise
               if train else 0.0)
        d = self.gen(z + eps)
        vol_m = self.canonical(m)
        mod = self.model_ft(batch, m, d, vol_m)
        y = self.crop_ft(rfft2c(batch["images"]), t, m)
        shell, band, mult = self._band(m, kmax_px)
        assert self.noise_shell is not None, "estimate_noise (or a checkpoint) sets noise_shell first"
        w = (mult / self.noise_shell[shell]) * band
        data = 0.5 * ((y - mod).abs().square() * w).sum((-1, -2))
        rig = self._rigidity(d, g)
        prior = z.abs().pow(c.latent_prior_pow).sum(-1)
        loss = (data + c.rigidity * rig + c.latent_prior * prior).sum() / n_global
        loss = loss + c.density_l2 * self.density.square().mean() / world()  # counted once over the ranks
        if train:
            self.opt_flow.zero_grad(set_to_none=True)
            self.opt_density.zero_grad(set_to_none=True)
            loss.backward()
            self._sum_gradients()
            self.opt_flow.step()
            self.opt_density.step()
            assert z.grad is not None  # z requires grad and the loss depends on it
            self.opt_latent.update(rows, z.grad * n_global)
        return float(data.detach().sum()), float(rig.detach().sum()), float(prior.detach().sum())

    def _idle_step(self) -> None:
        """A rank's part of a step when it holds none of the batch: the map's L2 term and the gradient sum."""
        self._noise_seed += 1
        self.opt_flow.zero_grad(set_to_none=True)
        self.opt_density.zero_grad(set_to_none=True)
        (self.cfg.density_l2 * self.density.square().mean() / world()).backward()
        self._sum_gradients()
        self.opt_flow.step()
        self.opt_density.step()

    def _sum_gradients(self) -> None:
        """Add the ranks' gradients of the shared parameters (a no-op in one process)."""
        if world() == 1:
            return
        grads: list[torch.Tensor] = []
        for prm in [*self.gen.parameters(), self.density]:
            if prm.grad is None:
                prm.grad = torch.zeros_like(prm)
            grads.append(prm.grad)
        all_reduce_flat_(grads)  # one exchange per step (bench/bench_scaling.py --flat-gradients)

    def _sync_latents(self, visited: np.ndarray) -> None:
        """After an epoch under torch.distributed: every rank gets every latent and its optimiser moments from
        the rank that visited it (`visited`: this rank's rows; each particle is in exactly one rank's share of
        one batch per epoch)."""
        if world() == 1:
            return
        keep = torch.zeros(len(self.p), dtype=torch.bool, device=self.dev)
        keep[torch.as_tensor(visited, device=self.dev)] = True
        for t in (self.latents, self.opt_latent.m, self.opt_latent.v, self.opt_latent.step):
            k = keep.view(-1, *([1] * (t.dim() - 1)))
            t.copy_(all_reduce_(torch.where(k, t, torch.zeros_like(t))))

    def _rigidity(self, d: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Volume-weighted mean rigidity cost per batch item, estimated without bias from a random subset of
        `rigidity_cells` cells (Σ over the subset × C/n): the exact mean costs B·C deformation gradients."""
        n_cells = self.cells.shape[0]
        n = self.cfg.rigidity_cells
        if n_cells <= n:
            return rigidity_penalty(deformation_gradients(d, self.cells, self.rest_inv), self.rig_weights)
        idx = torch.randperm(n_cells, generator=g)[:n].to(self.dev)
        fg = deformation_gradients(d, self.cells[idx], self.rest_inv[idx])
        return rigidity_penalty(fg, self.rig_weights[idx]) * (n_cells / n)

    def search_points(self, final: bool = False) -> int:
        """Grid points per latent axis of a search (finer for the final pass)."""
        c = self.cfg
        p = c.search_points or (15 if c.k == 1 else 9)
        return 3 * p - 4 if final and c.k == 1 else (2 * p - 3 if final else p)

    def search(self, m: int, kmax_px: float, final: bool = False, progress: Callable[[str], None] = print) -> None:
        """Replace every latent by its posterior mean over a grid of decoded maps (search.py); the latents'
        optimiser moments restart, since each latent has moved."""
        t0 = time.monotonic()
        grid = latent_grid(self.latents, self.search_points(final))
        z, st = search_latents(self, m, kmax_px, grid, batch_size=max(64, self.cfg.batch_size),
                               anchor_sd=LATENT_SD if self.seeded else None)
        z_kept = keep_spread(z, self.latents)
        st["shrink"] = float(z.var(0).sum().sqrt() / z_kept.var(0).sum().sqrt().clamp(min=1e-12))
        st["spread"] = [float(x) for x in z_kept.std(0)]
        self.latents.copy_(z_kept)
        for v in self.opt_latent.state_dict().values():
            v.zero_()
        st.update(epoch=self.epoch, final=final, seconds=time.monotonic() - t0)
        self.searches.append(dict(st))
        progress(f"flex-train: latent search over {st['points']} points at box {m}"
                 f"{' (final)' if final else ''}: mean best-point weight {st['best_weight']:.2f}, posterior-mean "
                 f"spread ×{st['shrink']:.2f} restored, latent sd " + ", ".join(f"{x:.3f}" for x in st["spread"])
                 + f" | {st['seconds']:.1f} s")

    def run_epoch(self, progress: Callable[[str], None] = print) -> EpochStats:
        c, t = self.cfg, self.spec.train
        e = self.epoch
        frac = kmax_schedule(c, e)
        m = working_box(t, frac)
        kmax_px = frac * t / 2
        for gr in self.opt_flow.param_groups:
            gr["lr"] = self._lr_flow(e)
        if c.search_every and e >= c.search_start and (e - c.search_start) % c.search_every == 0:
            sfrac = min(frac, c.search_kmax)
            self.search(working_box(t, sfrac), sfrac * t / 2, progress=progress)
        order = np.random.default_rng([c.seed, e]).permutation(len(self.p))
        self._noise_seed = (c.seed * 1000003 + e) * 100003
        sums = torch.zeros(3, dtype=torch.float64)
        t0 = time.monotonic()
        nb = math.ceil(len(order) / c.batch_size)
        batches = [np.sort(order[bi * c.batch_size:(bi + 1) * c.batch_size]) for bi in range(nb)]
        shares = [shard(rows) for rows in batches]  # this rank's part of each global batch (all in one process)
        # the batches read and prepared ahead by `loader_workers` DataLoader processes (0: here, one at a time)
        prepared = self.p.loader([mine for mine in shares if len(mine)], self.dev, self.loader_workers)
        for rows, mine in zip(batches, shares):
            if len(mine):
                sums += torch.tensor(self.step(next(prepared), m, kmax_px, n_global=len(rows)), dtype=torch.float64)
            else:  # more ranks than particles in a last small batch: only the shared terms' gradients
                self._idle_step()
        prepared.close()  # ends the loader's worker processes, if any
        visited = shares  # this rank's particles of the epoch
        self._sync_latents(np.concatenate(visited))
        data, rigidity, prior = (all_reduce_(sums) / len(order)).tolist()
        st = EpochStats(e, frac, m, data, rigidity, prior, time.monotonic() - t0)
        self.history.append(asdict(st))
        self.epoch += 1
        return st

    def fit(self, out: str | os.PathLike, progress: Callable[[str], None] = print,
            stop_after: int | None = None) -> None:
        """Train to cfg.epochs + extra_epochs, checkpointing every epoch; `stop_after` ends early (tests)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if not is_main():  # rank 0 alone prints and writes
            progress = _quiet
        total = self.cfg.epochs + self.cfg.extra_epochs
        if self.noise_shell is None:
            self.estimate_noise(progress)
        prog = Progress(total, "flex-train epoch", every=0, stream=progress)
        prog.t0 -= sum(h["seconds"] for h in self.history)  # ETA counts resumed epochs
        while self.epoch < total:
            st = self.run_epoch(progress)
            self.save_checkpoint(out / "checkpoint.pt")
            prog.step(self.epoch, f"box {st.box} k_max {st.kmax_frac:.2f} Nyq | data {st.data:.5g} "
                                  f"rigidity {st.rigidity:.4g} prior {st.prior:.4g} | {st.seconds:.1f} s")
            if stop_after is not None and self.epoch >= stop_after:
                return
        if self.cfg.final_search and not self.final_search_done:
            frac = kmax_schedule(self.cfg, total - 1)
            self.search(working_box(self.spec.train, frac), frac * self.spec.train / 2, final=True, progress=progress)
            self.final_search_done = True
            self.save_checkpoint(out / "checkpoint.pt")

    # --- persistence --------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "format": "flexplugin-flex-model", "version": 1, "config": asdict(self.cfg),
            "spec": asdict(self.spec), "epoch": self.epoch, "generator": self.gen.state_dict(),
            "density": self.density.detach().cpu(), "v_scale": self.v_scale, "mask": self.mask_t.cpu(),
            "latents": self.latents.cpu(), "ids": torch.tensor(self.p.ids), "scale": self.scale,
            "noise_shell": None if self.noise_shell is None else self.noise_shell.cpu(),
            "opt_flow": self.opt_flow.state_dict(), "opt_density": self.opt_density.state_dict(),
            "opt_latent": {k: v.cpu() for k, v in self.opt_latent.state_dict().items()},
            "history": self.history, "mesh_file": None, "radius_A": self.radius_A,
            "searches": self.searches, "final_search_done": self.final_search_done,
            "mesh_fingerprint": mesh_fingerprint(self.mesh),
        }

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Atomic write (temp + rename): an interrupted save never corrupts the last good checkpoint. Under
        torch.distributed only rank 0 writes (every rank holds the same state after an epoch)."""
        if is_main():
            torch_save(self.state(), path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resume from `path`; a foreign or unreadable file, or other boxes, mesh, settings or particles than
        the checkpoint's: InputError naming the difference, raised before any tensor is loaded."""
        d = _read_checkpoint(path, self.dev)
        self._check_same_setup(d, path)
        if self._lr_latent_auto:  # an automatic latent step size follows the checkpoint's
            self.cfg.lr_latent = d["config"]["lr_latent"]
            self.opt_latent.lr = self.cfg.lr_latent
        saved = {k: v for k, v in d["config"].items() if k not in ("epochs", "extra_epochs")}
        now = {k: v for k, v in asdict(self.cfg).items() if k not in ("epochs", "extra_epochs")}
        if saved != now:
            diff = "; ".join(f"{k} {saved.get(k)} in the checkpoint, {v} now" for k, v in now.items()
                             if saved.get(k) != v)
            raise InputError(f"cannot continue {path}: settings differ from the checkpoint's: {diff}; continue "
                             "with the original settings, or start a new training with a new --out")
        if not np.array_equal(d["ids"].numpy(), self.p.ids):
            raise InputError("cannot continue: the particles differ from the checkpoint's (ids)")
        self._check_sizes(d, path)
        self.gen.load_state_dict(d["generator"])
        with torch.no_grad():
            self.density.copy_(d["density"].to(self.dev))
            self.latents.copy_(d["latents"].to(self.dev))
        self.v_scale, self.scale = d["v_scale"], d["scale"]
        self.noise_shell = None if d["noise_shell"] is None else d["noise_shell"].to(self.dev)
        self.opt_flow.load_state_dict(d["opt_flow"])
        self.opt_density.load_state_dict(d["opt_density"])
        self.opt_latent.load_state_dict({k: v.to(self.dev) for k, v in d["opt_latent"].items()})
        self.history, self.epoch = d["history"], d["epoch"]
        self.searches, self.final_search_done = d.get("searches", []), d.get("final_search_done", False)

    def _check_same_setup(self, d: dict, path: str | os.PathLike) -> None:
        """Refuse a checkpoint of other boxes or another mesh (old vs new named): its tensors cannot fit this run."""
        hint = "; continue with the original settings, or start a new training with a new --out"
        old = d.get("spec") or asdict(self.spec)
        diffs = [f"{label} {old.get(k)} in the checkpoint, {v} now" for k, label, v in (
                 ("box", "particle box", self.spec.box), ("crop", "crop box (--crop)", self.spec.crop),
                 ("train", "training box (--train-box)", self.spec.train)) if old.get(k) != v]
        if not math.isclose(old.get("apix", 0.0), self.spec.apix, rel_tol=1e-5):
            diffs.append(f"pixel size {old.get('apix')} Å in the checkpoint, {self.spec.apix} Å now")
        if diffs:
            raise InputError(f"cannot continue {path}: the training box differs: {'; '.join(diffs)}{hint}")
        diff = mesh_difference(d.get("mesh_fingerprint"), mesh_fingerprint(self.mesh))
        if diff:
            raise InputError(f"cannot continue {path}: the mesh differs from the checkpoint's: {diff}; use the "
                             "mesh the training started with (same file and flex-mesh settings), or start a new "
                             "training with a new --out")

    def _check_sizes(self, d: dict, path: str | os.PathLike) -> None:
        """Last guard before loading (checkpoints without a mesh fingerprint): every tensor must fit this run's."""
        sizes = {k: tuple(v.shape) for k, v in self.gen.state_dict().items()}
        if sizes != {k: tuple(v.shape) for k, v in d["generator"].items()} or d["density"].shape != self.density.shape:
            raise InputError(f"cannot continue {path}: its flow generator or map has other sizes than this run's "
                             "(another mesh or training box); continue with the original settings, or start a new "
                             "training with a new --out")

    # --- diagnostics --------------------------------------------------------------------------------
    @torch.no_grad()
    def flow_for(self, z: torch.Tensor, m: int | None = None) -> torch.Tensor:
        """Per-voxel flow (B, m, m, m, 3) in Å at latent points z (B, K), on box m (training box default)."""
        m = m or self.spec.train
        d = self.gen(z.to(self.dev))
        apix_m = self.spec.apix_train * self.spec.train / m
        return self.raster(m).flow(d, apix_m) * apix_m
