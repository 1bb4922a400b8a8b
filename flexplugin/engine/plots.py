"""Plots every floor shares, as pure functions (arrays in, PNG out; matplotlib, Agg backend): FSC curves and the
masked FSC, central slices, image montages, map montages and the local-resolution gain. The engine's output writers
(va3d/outputs.py, flex/outputs.py), the CLI and the protocols draw with them; 3DVA's and 3D Flex's own diagnostics
are in va3d/plots.py and flex/plots.py."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

__all__ = ["plot_fsc", "plot_images", "plot_map_montage", "plot_masked_fsc", "plot_resolution_gain",
           "plot_slices"]


def _plt():
    """matplotlib.pyplot on the Agg backend (imported when a plot is drawn, not when this module is)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def plot_fsc(curves: dict[str, np.ndarray], apix: float, path: str | os.PathLike,
             title: str = "Fourier shell correlation", thresholds: Sequence[float] = (0.143, 0.5)) -> str:
    """FSC curves (name → values per shell 0..N/2) against spatial frequency, with threshold lines."""
    from .fourier import fsc_resolution
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


def _region_centre(region: np.ndarray) -> tuple[int, int, int]:
    """Voxel nearest the centre of mass of a boolean region (the box centre when it is empty)."""
    if not region.any():
        z, y, x = (s // 2 for s in region.shape)
    else:
        z, y, x = (round(float(c)) for c in np.argwhere(region).mean(0))
    return z, y, x


def plot_resolution_gain(gain: np.ndarray, baseline: np.ndarray, improved: np.ndarray, region: np.ndarray,
                         path: str | os.PathLike, labels: tuple[str, str] = ("noflex", "flex"),
                         apix: float | None = None) -> str:
    """Local resolution of the baseline and the improved map (Å, shared scale) and their difference, the gain
    (baseline − improved, Å; red: the improved map is sharper), on z, y and x slices through the centre of the
    region, with colour bars; voxels outside `region` are blank. The title gives the median gain in the region."""
    plt = _plt()
    region = np.asarray(region, bool)
    c = _region_centre(region)
    inside = region & (baseline > 0) & (improved > 0)
    res_vals = np.concatenate([baseline[inside], improved[inside]]) if inside.any() else np.array([0.0, 1.0])
    lo, hi = np.percentile(res_vals, [1, 99])
    hi = hi if hi > lo else lo + 1.0
    g = gain[inside] if inside.any() else np.zeros(1)
    gmax = float(np.percentile(np.abs(g), 99)) or 1.0
    rows = ((f"{labels[0]} local resolution (Å)", baseline, "viridis_r", lo, hi),
            (f"{labels[1]} local resolution (Å)", improved, "viridis_r", lo, hi),
            (f"gain: {labels[0]} − {labels[1]} (Å)", gain, "RdBu_r", -gmax, gmax))
    fig, axes = plt.subplots(3, 3, figsize=(9.6, 9.0), dpi=100)
    for r, (name, vol, cmap, vmin, vmax) in enumerate(rows):
        vol = np.ma.masked_where(~inside, vol)
        for k, (sl, lab) in enumerate(((vol[c[0]], f"z = {c[0]}"), (vol[:, c[1]], f"y = {c[1]}"),
                                       (vol[:, :, c[2]], f"x = {c[2]}"))):
            ax = axes[r, k]
            ax.set_facecolor("#dddddd")
            im = ax.imshow(sl, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{lab}", fontsize=8)
        fig.colorbar(im, ax=axes[r, :], shrink=0.85, label=name)
    median = float(np.median(g)) if inside.any() else float("nan")
    px = f" ({apix:.3f} Å/px)" if apix else ""
    fig.suptitle(f"Local resolution gain{px}: median {median:+.2f} Å inside the mask, "
                 f"{100 * float((g > 0).mean()):.0f} % of it improved", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_masked_fsc(curves: dict[str, dict], apix: float, path: str | os.PathLike,
                    title: str = "Half-map FSC, masked and corrected by phase randomisation") -> str:
    """Per map (name → the engine's masked-FSC dict: frequency, unmasked, masked, randomized, corrected and
    resolutions): the unmasked FSC (dotted), the masked FSC (dashed), the phase-randomised masked FSC (thin) and
    the corrected FSC (solid), against spatial frequency, with the 0.143 line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, d) in enumerate(curves.items()):
        col = colours[k % len(colours)]
        f = np.asarray(d["frequency"])[1:]  # from shell 1: the DC shell is a single number
        ax.plot(f, np.asarray(d["unmasked"])[1:], color=col, ls=":" if d.get("masked") is not None else "-", lw=1.2,
                label=f"{name} unmasked ({d['resolution_unmasked_A']:.2f} Å)")
        if d.get("masked") is not None:
            ax.plot(f, np.asarray(d["masked"])[1:], color=col, ls="--", lw=1.0,
                    label=f"{name} masked ({d['resolution_masked_A']:.2f} Å)")
        if d.get("randomized") is not None:
            ax.plot(f, np.asarray(d["randomized"])[1:], color=col, lw=0.7, alpha=0.7, label=f"{name} phase-randomised, masked")
        if d.get("corrected") is not None:
            ax.plot(f, np.asarray(d["corrected"])[1:], color=col, lw=1.8,
                    label=f"{name} corrected ({d['resolution_corrected_A']:.2f} Å)")
    ax.axhline(0.143, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.15, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.set_xlim(0, 1 / (2 * apix))
    top = ax.twiny()  # the same axis labelled in Å at round frequencies
    top.set_xlim(ax.get_xlim())
    ticks = np.linspace(0, 1 / (2 * apix), 6)[1:]
    top.set_xticks(ticks)
    top.set_xticklabels([f"{1 / t:.1f}" for t in ticks], fontsize=8)
    top.set_xlabel("resolution (Å)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
