"""Pure plotting functions: arrays in, PNG file out (matplotlib, Agg backend). Viewers wrap these."""
from __future__ import annotations

import os
from collections.abc import Sequence

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


def plot_images(images: np.ndarray, path: str | os.PathLike, ncol: int = 8, title: str = "",
                labels: Sequence[str] | None = None, shared_scale: bool = False, size: float = 1.3) -> str:
    """A montage of 2-D images (B, N, N), `ncol` per row, each `size` inches wide; `labels` title the images and
    `shared_scale` gives them one grey scale (0.5-99.9 percentiles of all), so their densities compare."""
    plt = _plt()
    images = np.asarray(images)
    ncol = max(1, min(ncol, len(images)))
    nrow = int(np.ceil(len(images) / ncol))
    height = size + (0.4 if labels is not None else 0.0)
    fig, axes = plt.subplots(nrow, ncol, figsize=(size * ncol, height * nrow + (0.3 if title else 0.0)), dpi=100,
                             squeeze=False)
    lo, hi = np.percentile(images, [0.5, 99.9]) if shared_scale else (None, None)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (ax, im) in enumerate(zip(axes.ravel(), images)):
        ax.imshow(im, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        if labels is not None and i < len(labels):
            ax.set_title(labels[i], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def plot_map_montage(volume_files: Sequence[str], path: str | os.PathLike, labels: Sequence[str], title: str = "",
                     ncol: int = 10) -> str:
    """The central z-slices of some MRC maps side by side (one grey scale), e.g. the frames of a series."""
    import mrcfile
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    slices = []
    for fn in volume_files:
        with mrcfile.mmap(fn, mode="r", permissive=True) as m:
            slices.append(np.array(m.data[m.data.shape[0] // 2], dtype=np.float32))
    return plot_images(np.stack(slices), path, ncol=ncol, title=title, labels=labels, shared_scale=True, size=1.5)
