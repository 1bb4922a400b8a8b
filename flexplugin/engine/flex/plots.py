"""3D Flex diagnostics as pure functions (arrays in, PNG out): latents, activations, flow, losses, mesh, atlas and
volume series; flex/outputs.py draws a run's outputs with them."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..plots import _plt, plot_images

__all__ = ["plot_activations", "plot_atlas", "plot_flow", "plot_latents", "plot_losses", "plot_mesh", "plot_series"]


def plot_latents(z: np.ndarray, path: str | os.PathLike, jitter: float = 0.05, seed: int = 0,
                 lim: float = 1.5, title: str = "3D Flex latent coordinates", max_dims: int = 4) -> str:
    """Pair plot of latents: 1-D histograms on the diagonal, jittered scatter (or hexbin for large N) below,
    2-D histograms (log counts) above, over the (−lim, lim) range; the jitter N(0, jitter²) is for display only.
    Only the first `max_dims` latents are drawn (the panels grow as K²; the title says so)."""
    plt = _plt()
    z = np.asarray(z, dtype=np.float64)
    n, k_all = z.shape
    k = min(k_all, max(1, max_dims))
    z = z[:, :k]
    if k < k_all:
        title = f"{title}, latents 0-{k - 1} of {k_all}"
    rng = np.random.default_rng(seed)
    zj = z + rng.normal(0, jitter, z.shape) if jitter > 0 else z
    size = 2.4 * k if k > 1 else 4.0
    fig, axes = plt.subplots(k, k, figsize=(size, size), dpi=100, squeeze=False)
    bins = np.linspace(-lim, lim, 61)
    for i in range(k):
        for j in range(k):
            ax = axes[i, j]
            if i == j:
                ax.hist(z[:, i], bins=bins, color="#3b6ea5")
                ax.set_xlim(-lim, lim)
            elif i > j:
                if n > 20000:
                    ax.hexbin(zj[:, j], zj[:, i], gridsize=60, extent=(-lim, lim, -lim, lim), mincnt=1, bins="log")
                else:
                    ax.scatter(zj[:, j], zj[:, i], s=2, alpha=0.4, lw=0)
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
            else:
                ax.hist2d(z[:, j], z[:, i], bins=bins, cmin=1, norm=_lognorm())
                ax.set_xlim(-lim, lim)
                ax.set_ylim(-lim, lim)
            if i == k - 1:
                ax.set_xlabel(f"latent {j}")
            if j == 0:
                ax.set_ylabel(f"latent {i}" if i != j else "count")
            ax.tick_params(labelsize=7)
    fig.suptitle(f"{title} (N={n})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _lognorm():
    from matplotlib.colors import LogNorm
    return LogNorm()


def plot_activations(t: np.ndarray, activations: Sequence[np.ndarray], path: str | os.PathLike,
                     latent_index: int = 0, max_units: int = 16) -> str:
    """Hidden-unit activations of the flow generator along one latent axis (others at 0), one panel per layer.

    Read it like cryoSPARC's: smooth, varied curves are healthy; flat lines mean an unused network,
    wiggly ones over-fitting."""
    plt = _plt()
    L = len(activations)
    fig, axes = plt.subplots(1, L, figsize=(2.2 * L, 2.4), dpi=100, squeeze=False)
    for li, a in enumerate(activations):
        ax = axes[0, li]
        a = np.asarray(a)
        var = a.var(0)
        units = np.argsort(-var)[:max_units]
        for u in units:
            ax.plot(t, a[:, u], lw=1)
        ax.set_title(f"layer {li + 1}", fontsize=8)
        ax.set_xlabel(f"latent {latent_index}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle("flow generator activations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_flow(volume: np.ndarray, flow: np.ndarray, path: str | os.PathLike, slice_index: int | None = None,
              axis: int = 0, title: str = "") -> str:
    """The same slice of the map three times, coloured by the x, y and z displacement (Å) of the flow.

    volume (m, m, m) [z, y, x]; flow (m, m, m, 3) xyz in Å. Colour is transparent where nothing moves.
    """
    plt = _plt()
    if slice_index is None:  # the slice with the most density
        slice_index = int(np.argmax(np.clip(volume, 0, None).sum(axis=tuple(i for i in range(3) if i != axis))))
    sl: list[slice | int] = [slice(None)] * 3
    sl[axis] = slice_index
    v = volume[tuple(sl)]
    f = flow[tuple(sl)]
    vmax = float(np.abs(f).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.6), dpi=100)
    for c, name in enumerate("xyz"):
        ax = axes[c]
        ax.imshow(v, cmap="gray", origin="lower")
        comp = np.ma.masked_where(np.abs(f[..., c]) < 0.02 * vmax, f[..., c])
        im = ax.imshow(comp, cmap="coolwarm", vmin=-vmax, vmax=vmax, alpha=0.7, origin="lower")
        ax.set_title(f"{name} displacement", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="Å")
    fig.suptitle(title or f"flow on slice {'zyx'[axis]} = {slice_index}", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_losses(history: Sequence[dict], path: str | os.PathLike) -> str:
    """Per-epoch data, rigidity and latent-prior terms (each particle's mean), and the working box."""
    plt = _plt()
    e = [h["epoch"] + 1 for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), dpi=100)
    for ax, key, lab in zip(axes, ("data", "rigidity", "prior"), ("data (whitened, in band)", "rigidity", "latent prior")):
        ax.plot(e, [h[key] for h in history], "o-", ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(lab, fontsize=9)
    ax2 = axes[0].twinx()
    ax2.plot(e, [h["box"] for h in history], color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("working box", color="grey", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_mesh(volume: np.ndarray, tetra_map: np.ndarray, rweights: np.ndarray, path: str | os.PathLike) -> str:
    """Central z, y, x slices: the map with the mesh's cell boundaries, and the rigidity weight per voxel."""
    plt = _plt()
    m = volume.shape[0]
    c = m // 2
    w = np.where(tetra_map >= 0, rweights[np.clip(tetra_map, 0, None)], np.nan)
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6), dpi=100)
    for k, (sv, st, sw, lab) in enumerate(((volume[c], tetra_map[c], w[c], "z"),
                                           (volume[:, c], tetra_map[:, c], w[:, c], "y"),
                                           (volume[:, :, c], tetra_map[:, :, c], w[:, :, c], "x"))):
        ax = axes[0, k]
        ax.imshow(sv, cmap="gray", origin="lower")
        edges = np.zeros_like(st, dtype=bool)
        edges[1:, :] |= st[1:, :] != st[:-1, :]
        edges[:, 1:] |= st[:, 1:] != st[:, :-1]
        ax.imshow(np.ma.masked_where(~edges, edges), cmap="autumn", alpha=0.6, origin="lower")
        ax.set_title(f"map + cells, {lab} = centre", fontsize=9)
        ax = axes[1, k]
        im = ax.imshow(sw, cmap="viridis", origin="lower", vmin=np.nanmin(w) if np.isfinite(w).any() else 0,
                       vmax=np.nanmax(w) if np.isfinite(w).any() else 1)
        ax.set_title(f"rigidity weight, {lab} = centre", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[1, :], shrink=0.8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_atlas(z: np.ndarray, grid_points: np.ndarray, thumbnails: np.ndarray, path: str | os.PathLike,
               axes_idx: tuple[int, int] = (0, 1), title: str = "3D Flex latent atlas") -> str:
    """Thumbnails (G, G, h, w) of generated volumes placed at their latent grid points, over the particle density.

    grid_points (G, G, 2) are the (x, y) latent values of each thumbnail; z (N, 2) the particles' latents on
    the same two axes, drawn beneath as a smoothed density. Thumbnails are cropped to the object and drawn
    with transparency proportional to density, so the particle density shows through between them."""
    from scipy import ndimage
    plt = _plt()
    G = thumbnails.shape[0]
    xs, ys = grid_points[0, :, 0], grid_points[:, 0, 1]
    dx = (xs[-1] - xs[0]) / max(G - 1, 1) or 1.0
    dy = (ys[-1] - ys[0]) / max(G - 1, 1) or 1.0
    x0, x1 = xs[0] - dx / 2, xs[-1] + dx / 2
    y0, y1 = ys[0] - dy / 2, ys[-1] + dy / 2
    lo, hi = np.percentile(thumbnails, [1, 99.8])
    norm = np.clip((thumbnails - lo) / max(hi - lo, 1e-12), 0, 1)
    occupied = norm.max(axis=(0, 1)) > 0.05
    if occupied.any():  # crop every thumbnail to the union of the objects (plus a margin)
        rr, cc = np.nonzero(occupied)
        mrg = 2
        r0, r1 = max(rr.min() - mrg, 0), min(rr.max() + mrg + 1, occupied.shape[0])
        c0, c1 = max(cc.min() - mrg, 0), min(cc.max() + mrg + 1, occupied.shape[1])
        side = max(r1 - r0, c1 - c0)
        rc, ccn = (r0 + r1) // 2, (c0 + c1) // 2
        r0, c0 = max(rc - side // 2, 0), max(ccn - side // 2, 0)
        norm = norm[:, :, r0:r0 + side, c0:c0 + side]
    fig, ax = plt.subplots(figsize=(1.3 * G + 1.5, 1.3 * G + 1.2), dpi=110)
    h, _, _ = np.histogram2d(z[:, 0], z[:, 1], bins=4 * G, range=[[x0, x1], [y0, y1]])
    h = ndimage.gaussian_filter(h, 1.0)
    ax.imshow(h.T, extent=(x0, x1, y0, y1), origin="lower", cmap="Blues", aspect="auto", interpolation="bilinear")
    for i in range(G):
        for j in range(G):
            t = norm[i, j]
            rgba = np.zeros(t.shape + (4,))
            rgba[..., :3] = 0.1
            rgba[..., 3] = t
            cx, cy = grid_points[i, j]
            ax.imshow(rgba, origin="lower", interpolation="bilinear", aspect="auto",
                      extent=(cx - 0.46 * dx, cx + 0.46 * dx, cy - 0.46 * dy, cy + 0.46 * dy))
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel(f"latent {axes_idx[0]}")
    ax.set_ylabel(f"latent {axes_idx[1]}")
    ax.set_title(title + "\n(projections of generated maps; particle density in blue)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_series(volumes: np.ndarray, path: str | os.PathLike, title: str = "", ncol: int = 9) -> str:
    """Montage of central z-slices of a volume series (up to `ncol` frames spread over it, in order), on one grey
    scale so that the frames' densities compare."""
    volumes = np.asarray(volumes)
    n = len(volumes)
    idx = np.linspace(0, n - 1, min(n, ncol)).round().astype(int)
    return plot_images(volumes[idx, volumes.shape[1] // 2], path, ncol=len(idx), title=title,
                       labels=[f"frame {i}" for i in idx], shared_scale=True, size=1.5)
