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

from ..ctf import compute_ctf
from ..fourier import rfft2c, shift_phase_2d
from ..projector import prepare_volume_ft
from ..va3d.slicing import Band, make_band, slice_coords
from .model import warp_volume

__all__ = ["SearchStats", "latent_grid", "search_latents", "slice_rows"]

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


def slice_rows(table: torch.Tensor, big_m: int, rotations: torch.Tensor, band: Band) -> torch.Tensor:
    """Central slices (B, G, nb) of G spectra held as rows `table` (M·M·(M//2+1), G) of a centred rfft on an
    M-grid, at the band of m-pixel images (M = 2m): trilinear, Friedel mates conjugated.

    The samples of va3d.slicing.slice_band (a test pins them together), but a voxel's G candidates are
    contiguous, so each corner is one row gather for all of them: grid_sample reads G channels stored a whole
    volume apart, which made the search 90 % of a full-resolution epoch at box 64.
    """
    w = big_m // 2 + 1
    c, conj = slice_coords(rotations, band, big_m)
    dev = c.device
    c0 = c.floor()
    f = c - c0
    c0 = c0.long()
    hi = torch.tensor([big_m - 1, big_m - 1, w - 1], device=dev)
    out = None
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = torch.minimum(c0 + torch.tensor([dz, dy, dx], device=dev), hi)
                wt = ((f[..., 0] if dz else 1 - f[..., 0]) * (f[..., 1] if dy else 1 - f[..., 1])
                      * (f[..., 2] if dx else 1 - f[..., 2]))
                term = table[(idx[..., 0] * big_m + idx[..., 1]) * w + idx[..., 2]] * wt[..., None]  # (B, nb, G)
                out = term if out is None else out + term
    out = torch.where(conj[..., None], out.conj(), out)
    return out.permute(0, 2, 1)


class SearchStats(dict):
    """Summary of one search pass: grid size, mean posterior weight of the best point, latent spread."""


@torch.no_grad()
def search_latents(tr, m: int, kmax_px: float, grid: torch.Tensor, batch_size: int = 256,
                   anchor_sd: float | None = None) -> tuple[torch.Tensor, SearchStats]:
    """Posterior-mean latents (N, K) of all particles of trainer `tr` over `grid` (G, K) at working box m.

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
    top = torch.full((n,), -math.inf, device=dev)
    acc_w = torch.zeros(n, device=dev)
    acc_z = torch.zeros(n, k, device=dev)
    best_p = torch.zeros(n, device=dev)
    per = (2 * m) ** 2 * (m + 1) * 8
    chunk = int(max(1, min(g_total, _SPECTRA_BYTES // per)))
    lo = t // 2 - m // 2
    amp = (t / m) ** 3 * tr.scale
    for c0 in range(0, g_total, chunk):
        zg = grid[c0:c0 + chunk]
        u = tr.raster(m).flow(tr.gen(zg), apix_m)
        spectra = prepare_volume_ft(warp_volume(vol_m, u), pad=2)  # (Gc, 2m, 2m, m+1)
        table = spectra.reshape(len(zg), -1).T.contiguous()  # (voxels, Gc): a voxel's candidates side by side
        del spectra
        lp_c = log_prior[c0:c0 + chunk]
        for s in range(0, n, batch_size):
            rows = np.arange(s, min(n, s + batch_size))
            b = tr.p.batch(rows, dev)
            y = band.take(rfft2c(b["images"])[..., lo:lo + m, : m // 2 + 1])  # (B, nb)
            f = shift_phase_2d(m, -b["shifts"] * (m / t)) * compute_ctf(b["ctf"], m, apix_m, tr.p.ps.phase_flipped)
            s_ = slice_rows(table, 2 * m, b["rotations"], band) * (band.take(f) * amp)[:, None]  # (B, Gc, nb)
            chi2 = ((y[:, None] - s_).abs().square() * wts).sum(-1)  # (B, Gc)
            logp = lp_c - 0.5 * chi2
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
    z = (acc_z / acc_w[:, None]).clamp(-1.5, 1.5)
    stats = SearchStats(points=g_total, box=m, best_weight=float((best_p / acc_w).mean()),
                        spread=[float(x) for x in z.std(0)])
    return z, stats
