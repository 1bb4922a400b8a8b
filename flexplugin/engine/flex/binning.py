"""Latent bins for the 3D Flex reconstruction: particles whose flows agree to a fraction of a voxel share one.

The reconstruction (reconstruct.py) replaces each particle's deformation by its bin's, so the cost of an
evaluation depends on the number of bins G, not on the number of particles. A bin is a k-means cluster of
the latents; its deformation is the mean of its members' mesh-vertex displacements (the least-squares best
single displacement, and the flow is linear in them). The error of that replacement is measured directly
from the model: a particle's *flow spread* is the largest distance, over the mesh vertices, between its own
displacement and its bin's, in voxels of the reconstruction box. The barycentric flow of any voxel is a convex
combination of vertex displacements, so no voxel's flow differs by more than that. G is doubled until the
spread of (almost) every particle is below the tolerance, or the cap is reached. For large N the centres
are fitted on a subsample and every particle joins its nearest centre. See docs/flex_reconstruction.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cluster import kmeans
from .reconstruct_config import FLOW_TOL, MAX_BINS

__all__ = ["LatentBins", "bins_from_labels", "choose_bins", "kmeans_labels", "significance_shrinkage",
           "vertex_displacements"]


@dataclass
class LatentBins:
    """Bin label per particle (N,), mean vertex displacements per bin (G, V, 3) in Å, flow spreads (voxels)."""

    labels: np.ndarray
    displacements: torch.Tensor
    spread: np.ndarray  # (N,) per-particle max vertex deviation from its bin, voxels of the reconstruction box
    quantile: float  # the spread quantile that was held to the tolerance

    @property
    def count(self) -> int:
        return int(self.displacements.shape[0])

    def spread_at(self, q: float | None = None) -> float:
        """The q-quantile of the particles' flow spread (default: the quantile the bins were chosen by)."""
        return float(np.quantile(self.spread, self.quantile if q is None else q)) if len(self.spread) else 0.0


@torch.no_grad()
def vertex_displacements(gen: torch.nn.Module, z: np.ndarray, batch: int = 4096) -> torch.Tensor:
    """Mesh-vertex displacements (N, V, 3) in Å decoded from latents z (N, K) by the flow generator."""
    dev = next(gen.parameters()).device
    out = [gen(torch.as_tensor(z[s:s + batch], dtype=torch.float32, device=dev)).float()
           for s in range(0, len(z), batch)]
    return torch.cat(out)


def significance_shrinkage(d: torch.Tensor, apix_box: float, noise_vox: float) -> torch.Tensor:
    """Per-vertex factors (V,) in [0, 1] for displacements d (N, V, 3) Å about their mean over the particles: the
    least-squares shrinkage 1 − (τ/rms_v)² of a vertex whose displacements carry noise of rms τ = `noise_vox` voxels
    (rms_v their spread over the particles, in voxels of the box), 0 where rms_v ≤ τ (docs/algorithms.md, 2.4).

    Why: a displacement estimate s + n (signal rms a, noise rms τ) scaled by f leaves a misalignment of variance
    (1 − f)²a² + f²τ², least at f = a²/(a² + τ²) = 1 − τ²/rms², and then below both a² (no flex) and τ² (the flow as
    trained): the flex map is then no worse than its rigid start where nothing, or little, moves."""
    if noise_vox <= 0 or d.shape[0] == 0 or d.shape[1] == 0:
        return torch.ones(d.shape[1], dtype=d.dtype, device=d.device)
    rms = d.square().sum(-1).mean(0).sqrt() / apix_box
    return (1 - (noise_vox / rms.clamp(min=1e-12)) ** 2).clamp(min=0)


def bins_from_labels(d: torch.Tensor, labels: np.ndarray, apix_box: float, quantile: float = 0.95) -> LatentBins:
    """Bins of given labels (0..G−1, every bin non-empty): mean displacements and each particle's spread."""
    lab = torch.as_tensor(labels, dtype=torch.long, device=d.device)
    g = int(lab.max()) + 1 if len(lab) else 0
    sums = torch.zeros(g, *d.shape[1:], dtype=d.dtype, device=d.device).index_add_(0, lab, d)
    counts = torch.bincount(lab, minlength=g).clamp(min=1).to(d.dtype)
    mean = sums / counts[:, None, None]
    spread = (d - mean[lab]).norm(dim=-1).amax(-1) / apix_box if d.shape[1] else torch.zeros(len(lab))
    return LatentBins(np.asarray(labels), mean, spread.cpu().numpy(), quantile)


def kmeans_labels(z: np.ndarray, g: int, seed: int = 0, sample: int = 4000) -> np.ndarray:
    """Labels 0..G'−1 (G' ≤ g, no empty bin) of a k-means clustering of z (N, K): the centres are fitted on at most
    `sample` particles (k-means' cost grows with N·G per iteration) and every particle joins its nearest centre."""
    n = len(z)
    x = np.asarray(z, dtype=np.float64)
    if n <= sample:
        return _compact(kmeans(x, g, seed)[0])
    sub = np.random.default_rng(seed).choice(n, sample, replace=False)
    centres = kmeans(x[sub], g, seed)[1]
    labels = np.empty(n, dtype=np.int64)
    for s in range(0, n, 8192):
        labels[s:s + 8192] = ((x[s:s + 8192, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    return _compact(labels)


def choose_bins(z: np.ndarray, d: torch.Tensor, apix_box: float, tol_vox: float = FLOW_TOL, max_bins: int = MAX_BINS,
                quantile: float = 0.95, seed: int = 0) -> LatentBins:
    """k-means bins of latents z (N, K), doubling G from 1 until the `quantile` of the flow spread is at most
    `tol_vox` voxels (or G reaches `max_bins` or N); d (N, V, 3) are the particles' vertex displacements."""
    n = len(z)
    g = 1
    while True:
        labels = np.zeros(n, dtype=np.int64) if g == 1 else kmeans_labels(z, g, seed)
        bins = bins_from_labels(d, labels, apix_box, quantile)
        if bins.spread_at() <= tol_vox or g >= min(max_bins, n):
            return bins
        g = min(2 * g, max_bins, n)


def _compact(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..G−1 with no empty label (k-means keeps every cluster, but be safe)."""
    return np.unique(labels, return_inverse=True)[1].astype(np.int64)
