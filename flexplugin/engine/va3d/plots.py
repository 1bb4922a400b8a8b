"""3DVA plots: pure functions, arrays in, PNG out (matplotlib, Agg backend); the engine draws its outputs with them."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..plots import _plt

__all__ = ["plot_latent_histograms", "plot_latent_pairs", "plot_convergence", "plot_explained_variance",
           "plot_component_slices", "plot_clusters", "plot_frame_counts"]


def _save(fig, path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return str(path)


def plot_latent_histograms(z: np.ndarray, path: str | os.PathLike, bins: int = 60,
                           truth: np.ndarray | None = None) -> str:
    """One histogram per component of the coordinates z (N, K)."""
    plt = _plt()
    z = np.asarray(z)
    K = z.shape[1]
    ncol = min(K, 4)
    nrow = int(np.ceil(K / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), dpi=100, squeeze=False)
    for ax in axes.ravel()[K:]:
        ax.axis("off")
    for k in range(K):
        ax = axes.ravel()[k]
        ax.hist(z[:, k], bins=bins, color="C0", alpha=0.85)
        ax.set_title(f"component {k}", fontsize=9)
        ax.set_xlabel("coordinate", fontsize=8)
    fig.suptitle("3DVA coordinates", fontsize=10)
    return _save(fig, path)


def plot_latent_pairs(z: np.ndarray, path: str | os.PathLike, gridsize: int = 40,
                      color: np.ndarray | None = None, max_components: int = 6) -> str:
    """Pairwise hexbin density (lower triangle) of the coordinates; histograms on the diagonal.

    With `color` (N,), points are scattered coloured by it instead (e.g. ground truth or clusters).
    """
    plt = _plt()
    z = np.asarray(z)[:, :max_components]
    K = z.shape[1]
    fig, axes = plt.subplots(K, K, figsize=(2.3 * K, 2.3 * K), dpi=100, squeeze=False)
    for i in range(K):
        for j in range(K):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            if i == j:
                ax.hist(z[:, i], bins=50, color="grey")
            elif color is None:
                ax.hexbin(z[:, j], z[:, i], gridsize=gridsize, cmap="viridis", mincnt=1, bins="log")
            else:
                ax.scatter(z[:, j], z[:, i], c=color, s=2, cmap="coolwarm", rasterized=True)
            if i == K - 1:
                ax.set_xlabel(f"z{j}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"z{i}", fontsize=8)
            ax.tick_params(labelsize=6)
    return _save(fig, path)


def plot_convergence(history: Sequence[dict], path: str | os.PathLike) -> str:
    """Objective (−log-likelihood per particle) and subspace change per iteration."""
    plt = _plt()
    it = [h["iteration"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    if it:
        a1.plot(it, [h["objective"] for h in history], "o-", ms=3)
        a2.semilogy(it, [max(h["subspace_change"], 1e-12) for h in history], "o-", ms=3, color="C1")
    a1.set_xlabel("iteration")
    a1.set_ylabel("objective (−log L per particle)")
    a2.set_xlabel("iteration")
    a2.set_ylabel("subspace change")
    fig.suptitle("3DVA convergence", fontsize=10)
    return _save(fig, path)


def plot_explained_variance(eigenvalues: np.ndarray, path: str | os.PathLike, floor: float | None = None) -> str:
    """Bar chart of the per-component variance, with the noise floor if known."""
    plt = _plt()
    ev = np.asarray(eigenvalues, dtype=float)
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    ax.bar(np.arange(len(ev)), ev, color="C0")
    if floor is not None:
        ax.axhline(floor, color="C3", ls="--", lw=1.2, label="noise floor (pose-shuffled)")
        ax.legend(fontsize=8)
    ax.set_xlabel("component")
    ax.set_ylabel("variance (eigenvalue)")
    ax.set_xticks(np.arange(len(ev)))
    return _save(fig, path)


def plot_component_slices(consensus: np.ndarray, components: np.ndarray, path: str | os.PathLike) -> str:
    """Central z/y/x slices of the consensus (grey) and of each component (diverging colours)."""
    plt = _plt()
    vols = [np.asarray(consensus)] + [np.asarray(c) for c in components]
    fig, axes = plt.subplots(len(vols), 3, figsize=(7.0, 2.3 * len(vols)), dpi=90, squeeze=False)
    for r, v in enumerate(vols):
        c = v.shape[0] // 2
        lim = float(np.abs(v).max()) or 1.0
        for k, sl in enumerate((v[c], v[:, c], v[:, :, c])):
            ax = axes[r, k]
            if r == 0:
                ax.imshow(sl, cmap="gray", origin="lower")
            else:
                ax.imshow(sl, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(("consensus" if r == 0 else f"component {r - 1}") + f" {'zyx'[k]} slice", fontsize=8)
    return _save(fig, path)


def plot_clusters(z: np.ndarray, labels: np.ndarray, centers: np.ndarray, path: str | os.PathLike,
                  three_d: bool = False) -> str:
    """Coordinates coloured by k-means cluster (first two or three components), centres marked."""
    plt = _plt()
    z = np.asarray(z)
    fig = plt.figure(figsize=(5, 4.4), dpi=100)
    if three_d and z.shape[1] >= 3:
        ax = fig.add_subplot(projection="3d")
        ax.scatter(z[:, 0], z[:, 1], z[:, 2], c=labels, s=2, cmap="tab20")
        ax.scatter(centers[:, 0], centers[:, 1], centers[:, 2], c="k", marker="x", s=40)
        ax.set_zlabel("z2")
    else:
        ax = fig.add_subplot()
        y = z[:, 1] if z.shape[1] > 1 else np.zeros(len(z))
        cy = centers[:, 1] if z.shape[1] > 1 else np.zeros(len(centers))
        ax.scatter(z[:, 0], y, c=labels, s=3, cmap="tab20")
        ax.scatter(centers[:, 0], cy, c="k", marker="x", s=40)
        for c, (x0, y0) in enumerate(zip(centers[:, 0], cy)):
            ax.annotate(str(c), (x0, y0), fontsize=7)
    ax.set_xlabel("z0")
    ax.set_ylabel("z1")
    ax.set_title("k-means clusters", fontsize=10)
    return _save(fig, path)


def plot_frame_counts(counts: np.ndarray, path: str | os.PathLike) -> str:
    """Effective particle count (sum of weights) per frame, one line per component (C, F)."""
    plt = _plt()
    counts = np.atleast_2d(np.asarray(counts, dtype=float))
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for k, c in enumerate(counts):
        ax.plot(np.arange(len(c)), c, "o-", ms=3, label=f"component {k}")
    ax.set_xlabel("frame")
    ax.set_ylabel("particles (sum of weights)")
    ax.legend(fontsize=8)
    return _save(fig, path)
