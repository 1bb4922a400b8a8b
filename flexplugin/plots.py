"""Pure plotting functions: arrays in, PNG file out (matplotlib, Agg backend). Viewers wrap these."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_fsc(curves: dict[str, np.ndarray], apix: float, path: str | os.PathLike,
             title: str = "Fourier shell correlation", thresholds: Sequence[float] = (0.143, 0.5)) -> str:
    """FSC curves (name → values per shell 0..N/2) against spatial frequency, with threshold lines."""
    from .engine.fourier import fsc_resolution
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for name, c in curves.items():
        c = np.asarray(c)
        f = np.arange(len(c)) / (2 * (len(c) - 1) * apix)
        res = fsc_resolution(c, apix, 0.143)
        ax.plot(f, c, lw=1.6, label=f"{name} (0.143: {res:.2f} Å)")
    for t in thresholds:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
        ax.text(0.002, t + 0.015, f"{t}", color="grey", fontsize=8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    sec = ax.secondary_xaxis("top", functions=(lambda x: 1 / np.maximum(x, 1e-6), lambda x: 1 / np.maximum(x, 1e-6)))
    sec.set_xlabel("resolution (Å)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_slices(volumes: dict[str, np.ndarray], path: str | os.PathLike, title: str = "") -> str:
    """Central z, y and x slices of each volume, one row per volume."""
    plt = _plt()
    names = list(volumes)
    fig, axes = plt.subplots(len(names), 3, figsize=(7.5, 2.5 * len(names)), dpi=100, squeeze=False)
    for r, name in enumerate(names):
        v = np.asarray(volumes[name])
        c = v.shape[0] // 2
        for k, (sl, lab) in enumerate(((v[c], "z"), (v[:, c], "y"), (v[:, :, c], "x"))):
            ax = axes[r, k]
            ax.imshow(sl, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {lab} = centre", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_images(images: np.ndarray, path: str | os.PathLike, ncol: int = 8, title: str = "") -> str:
    """A montage of 2-D images (B, N, N)."""
    plt = _plt()
    images = np.asarray(images)
    nrow = int(np.ceil(len(images) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.3 * ncol, 1.3 * nrow), dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, im in zip(axes.ravel(), images):
        ax.imshow(im, cmap="gray", origin="lower")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
