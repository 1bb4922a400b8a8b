"""Latent search: every particle's latent re-estimated against maps decoded on a grid of latent points.

An auto-decoder latent gets one optimiser step per visit, so training alone can neither improve a good
seed nor leave a poor one. Here the current model is decoded at G latent points z_g into deformed maps
W_g = V(x + u_g(x)) (G warps and 3-D FFTs, shared by all particles); each particle's image is compared with
the central slices of every W_g at its pose, with the training's CTF, shift, scale and whitening: a cost
of G·D² per particle instead of one D³ warp per candidate. The new latent is the posterior mean over the
grid under the training likelihood (whitened χ²/2) and the centring prior: it interpolates between grid
points, and where the data cannot tell the candidates apart it stays near the middle instead of jumping
to a noisy best match.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..ctf import compute_ctf
from ..distributed import all_reduce_, shard
from ..fourier import rfft2c, shift_phase_2d
from ..projector import prepare_volume_ft
from ..va3d.slicing import Band, make_band, slice_coords
from .model import warp_volume

__all__ = ["SearchStats", "SearchTables", "batch_scores", "latent_grid", "search_latents", "slice_rows",
           "slice_scores"]

# bytes of decoded spectra held at once: bounds memory at large boxes by decoding the grid in chunks
_SPECTRA_BYTES = 2 ** 29


def latent_grid(z: torch.Tensor, points_per_axis: int, limit: float = 1.5, margin: float = 0.15) -> torch.Tensor:
    """Candidate latent points (G, K) spanning the current latents' range (0.5–99.5 %), widened by `margin` of
    the span on each side (so the range can grow) and clipped to ±limit: a regular grid for K ≤ 2, a
    scrambled Sobol set of points_per_axis² points for K ≥ 3."""
    z = z.detach().float().cpu()
    k = z.shape[1]
    lo = torch.quantile(z, 0.005, dim=0)
    hi = torch.quantile(z, 0.995, dim=0)
    span = (hi - lo).clamp(min=0.2)
    lo = (lo - margin * span).clamp(-limit, limit)
    hi = (hi + margin * span).clamp(-limit, limit)
    if k <= 2:
        axes = [torch.linspace(float(a), float(b), points_per_axis) for a, b in zip(lo, hi)]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, k)
    sob = torch.quasirandom.SobolEngine(k, scramble=True, seed=0).draw(points_per_axis ** 2)
    return lo + sob * (hi - lo)


def _corners(rotations: torch.Tensor, band: Band, big_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trilinear corners of the band's slice samples in a centred rfft on an M-grid (M = big_m): flat voxel
    indices (B, nb, 8) into its (M, M, M//2+1) layout, their weights (B, nb, 8), and the Friedel flags (B, nb).

    A sample on the grid's last plane (Nyquist of the m-box) is moved in by 1e-3 voxel, so that its upper
    corners stay inside the grid: the same value as clamping them, with one flat index per sample plus 8 fixed
    offsets instead of 8 clamped index triples."""
    w = big_m // 2 + 1
    c, conj = slice_coords(rotations, band, big_m)
    dev = c.device
    hi = torch.tensor([big_m - 1, big_m - 1, w - 1], device=dev, dtype=c.dtype)
    c = torch.minimum(c, hi - 1e-3)
    c0 = c.floor()
    f = c - c0
    c0 = c0.long()
    base = (c0[..., 0] * big_m + c0[..., 1]) * w + c0[..., 2]
    offs = [(dz, dy, dx) for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    step = torch.tensor([(dz * big_m + dy) * w + dx for dz, dy, dx in offs], device=dev)
    flat = base[..., None] + step
    fz, fy, fx = (torch.stack([1 - f[..., i], f[..., i]], -1) for i in range(3))  # (B, nb, 2) per axis
    wt = (fz[..., :, None, None] * fy[..., None, :, None] * fx[..., None, None, :]).reshape(*base.shape, 8)
    return flat, wt, conj


def slice_rows(table: torch.Tensor, big_m: int, rotations: torch.Tensor, band: Band) -> torch.Tensor:
    """Central slices (B, G, nb) of G spectra held as rows `table` (M·M·(M//2+1), G) of a centred rfft on an
    M-grid, at the band of m-pixel images (M = 2m): trilinear, Friedel mates conjugated.

    The samples of va3d.slicing.slice_band (a test pins them together), with a voxel's G candidates contiguous.
    The search itself never forms the slices (slice_scores): this is the exact reference its scores are tested
    against.
    """
    flat, wt, conj = _corners(rotations, band, big_m)
    out = (table[flat] * wt[..., None]).sum(-2)  # (B, nb, G)
    out = torch.where(conj[..., None], out.conj(), out)
    return out.permute(0, 2, 1)


class SearchTables:
    """G decoded spectra (G, M, M, M//2+1) laid out for slicing: one row per voxel holding the real parts of its
    G candidates, then their imaginary parts (V, 2G), V = M·M·(M//2+1)."""

    def __init__(self, spectra: torch.Tensor):
        g = spectra.shape[0]
        self.big_m = spectra.shape[-3]
        rows = spectra.reshape(g, -1).T  # (V, G)
        self.rows = torch.cat([rows.real, rows.imag], 1).contiguous()

    @staticmethod
    def bytes_per_point(big_m: int) -> int:
        """Memory of one candidate's table and the spectrum it is made from."""
        return big_m * big_m * (big_m // 2 + 1) * 16


def slice_scores(tables: SearchTables, rotations: torch.Tensor, band: Band, q: torch.Tensor,
                 p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per particle and candidate (B, G): the cross term Re Σ_k q_k·S_g(k) and the power term Σ_k p_k·|S_g(k)|²,
    where S_g is candidate g's central slice at the particle's pose (trilinear, Friedel mates conjugated).

    With q = w·conj(Y)·a and p = w·|a|² (a: CTF × shift × scale), the whitened χ² is Σ w|Y|² − 2·cross + power.
    Each slice sample is one weighted sum of 8 table rows (`embedding_bag`, one kernel for all G candidates
    instead of 8 gathers and their temporaries: 10× faster), and both terms are then batched matrix products.
    """
    flat, wt, conj = _corners(rotations, band, tables.big_m)
    b, nb = conj.shape
    g = tables.rows.shape[1] // 2
    s = F.embedding_bag(flat.reshape(-1, 8), tables.rows, per_sample_weights=wt.reshape(-1, 8), mode="sum")
    s = s.view(b, 2 * nb, g)  # per sample: real parts of the G candidates, then imaginary parts
    q = torch.where(conj, q.conj(), q)  # Re(q·conj(S)) = Re(conj(q)·S)
    coef = torch.stack([q.real, -q.imag], -1).reshape(b, 1, 2 * nb)
    cross = torch.bmm(coef, s)[:, 0]
    power = torch.bmm(p.repeat_interleave(2, -1).view(b, 1, 2 * nb), s.square())[:, 0]
    return cross, power


def batch_scores(tr, b: dict, tables: SearchTables, band: Band, wts: torch.Tensor,
                 m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slice_scores (cross, power) of a batch `b` of trainer `tr`'s particles against `tables` at working box m,
    under the training's image model: a·S_g with a = CTF × shift × scale, whitened by `wts` on the band."""
    t = tr.spec.train
    lo = t // 2 - m // 2
    apix_m = tr.spec.apix_train * t / m
    y = band.take(rfft2c(b["images"])[..., lo:lo + m, : m // 2 + 1])  # (B, nb)
    f = shift_phase_2d(m, -b["shifts"] * (m / t)) * compute_ctf(b["ctf"], m, apix_m, tr.p.ps.phase_flipped)
    a = band.take(f) * ((t / m) ** 3 * tr.scale)  # (B, nb)
    return slice_scores(tables, b["rotations"], band, wts * y.conj() * a, wts * a.abs().square())


class SearchStats(dict):
    """Summary of one search pass: grid size, mean posterior weight of the best point, latent spread."""


@torch.no_grad()
def search_latents(tr, m: int, kmax_px: float, grid: torch.Tensor, batch_size: int = 256,
                   anchor_sd: float | None = None) -> tuple[torch.Tensor, SearchStats]:
    """Posterior-mean latents (N, K) of all particles of trainer `tr` over `grid` (G, K) at working box m.
    Under torch.distributed each rank scores its share of the particles and all ranks get every latent.

    `tr` is a FlexTrainer: its generator, canonical map, mesh raster, scale, noise spectrum and particles
    define the same image model as the training step, sliced in Fourier space instead of splatted.
    `anchor_sd` adds a Gaussian prior of that width around each particle's current latent: a seed is then
    kept where the model cannot yet tell the candidates apart, and moved where the data say so.
    """
    t = tr.spec.train
    dev = tr.dev
    apix_m = tr.spec.apix_train * t / m
    grid = grid.to(dev, torch.float32)
    g_total, k = grid.shape
    band = make_band(m, dev, kmax_px=kmax_px)
    wts = band.weight / tr.noise_shell[band.shell.clamp(max=t // 2)]
    c = tr.cfg
    log_prior = -c.latent_prior * grid.abs().pow(c.latent_prior_pow).sum(-1)  # (G,)
    vol_m = tr.canonical(m).detach()
    n = len(tr.p)
    mine = shard(np.arange(n))  # this rank's particles (all of them in one process); summed over ranks below
    top = torch.full((n,), -math.inf, device=dev)
    acc_w = torch.zeros(n, device=dev)
    acc_z = torch.zeros(n, k, device=dev)
    best_p = torch.zeros(n, device=dev)
    chunk = int(max(1, min(g_total, _SPECTRA_BYTES // SearchTables.bytes_per_point(2 * m))))
    for c0 in range(0, g_total, chunk):
        zg = grid[c0:c0 + chunk]
        u = tr.raster(m).flow(tr.gen(zg), apix_m)
        tables = SearchTables(prepare_volume_ft(warp_volume(vol_m, u), pad=2))  # spectra (Gc, 2m, 2m, m+1)
        lp_c = log_prior[c0:c0 + chunk]
        for s in range(0, len(mine), batch_size):
            rows = mine[s:s + batch_size]
            cross, power = batch_scores(tr, tr.p.batch(rows, dev), tables, band, wts, m)
            logp = lp_c - 0.5 * (power - 2 * cross)  # −½ χ², up to Σ w|Y|², the same for every candidate
            r = torch.as_tensor(rows, device=dev)
            if anchor_sd:
                logp = logp - torch.cdist(tr.latents[r], zg).square() / (2 * anchor_sd ** 2)
            new_top = torch.maximum(top[r], logp.max(1).values)
            e = torch.exp(logp - new_top[:, None])
            decay = torch.exp(top[r] - new_top)
            acc_w[r] = acc_w[r] * decay + e.sum(1)
            acc_z[r] = acc_z[r] * decay[:, None] + e @ zg
            best_p[r] = torch.maximum(best_p[r] * decay, e.max(1).values)
            top[r] = new_top
    r = torch.as_tensor(mine, device=dev)
    z = torch.zeros(n, k, device=dev)
    z[r] = (acc_z[r] / acc_w[r, None]).clamp(-1.5, 1.5)
    best = torch.zeros(n, device=dev)
    best[r] = best_p[r] / acc_w[r]
    all_reduce_(z)
    all_reduce_(best)
    stats = SearchStats(points=g_total, box=m, best_weight=float(best.mean()), spread=[float(x) for x in z.std(0)])
    return z, stats
