"""Selecting particles by their latent coordinates: boxes, k-means clusters and spheres, plus the selection plot.

Pure numpy (and matplotlib for the plot), no Scipion or torch import: FlexPluginProtSubset runs it inside the
protocol process, and it is tested on its own. User-facing numbers are 1-based (latent dimension 1 is the first
zFlex column, cluster 1 the first cluster), as in the 3DVA display protocol; the arrays returned are 0-based.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from flexplugin.engine.cluster import lloyd  # numpy only: the engine package imports no torch at this level

__all__ = ["parse_box", "parse_point", "parse_ids", "standardise", "box_mask", "sphere_mask", "kmeans",
           "cluster_mask", "plot_selection", "UNITS"]

UNITS = ["latent", "sd"]  # raw latent values, or standard deviations from the mean of each dimension


def parse_box(text: str, k: int) -> dict[int, tuple[float, float]]:
    """Parse per-dimension ranges 'D: MIN MAX; D: MIN MAX' (D from 1 to k) into {0-based dim: (min, max)}.

    MIN/MAX are numbers, 'inf' or '-inf' (or '*' for an open end); dimensions not named are not constrained.
    Raises ValueError with a message saying what to fix.
    """
    if text is None or not str(text).strip():
        raise ValueError("give at least one range, e.g. '1: -1.5 0.5; 2: 0 2' (latent dimension: min max)")
    ranges: dict[int, tuple[float, float]] = {}
    for part in (p.strip() for p in str(text).replace("\n", ";").split(";")):
        if not part:
            continue
        if ":" not in part:
            raise ValueError(f"range '{part}' has no ':': write 'dimension: min max', e.g. '1: -1.5 0.5'")
        head, _, body = part.partition(":")
        try:
            dim = int(head.strip())
        except ValueError:
            raise ValueError(f"range '{part}': the dimension '{head.strip()}' is not an integer "
                             f"(latent dimensions are numbered 1 to {k})") from None
        if not 1 <= dim <= k:
            raise ValueError(f"range '{part}': latent dimension {dim} does not exist, the particles have "
                             f"dimensions 1 to {k}")
        if dim - 1 in ranges:
            raise ValueError(f"latent dimension {dim} is given twice: give one range per dimension")
        words = [w for w in re.split(r"[\s,]+", body.strip()) if w]
        if len(words) != 2:
            raise ValueError(f"range '{part}': give exactly two bounds, min and max (use * for an open end)")
        bounds = []
        for w, default in zip(words, (-math.inf, math.inf)):
            if w == "*":
                bounds.append(default)
                continue
            try:
                bounds.append(float(w))
            except ValueError:
                raise ValueError(f"range '{part}': '{w}' is not a number (use * for an open end)") from None
        lo, hi = bounds
        if math.isnan(lo) or math.isnan(hi) or lo >= hi:
            raise ValueError(f"range '{part}': the minimum must be smaller than the maximum")
        ranges[dim - 1] = (lo, hi)
    if not ranges:
        raise ValueError("give at least one range, e.g. '1: -1.5 0.5; 2: 0 2' (latent dimension: min max)")
    return ranges


def parse_point(text: str, k: int) -> np.ndarray:
    """Parse a latent point 'z1, z2, ...' with exactly k values."""
    words = [w for w in re.split(r"[\s,;]+", str(text or "").strip()) if w]
    try:
        values = [float(w) for w in words]
    except ValueError:
        raise ValueError(f"the centre '{text}' must be {k} numbers separated by commas") from None
    if len(values) != k or not all(math.isfinite(v) for v in values):
        raise ValueError(f"the centre must have one finite value per latent dimension ({k}), got '{text}'")
    return np.array(values)


def parse_ids(text: str, n: int) -> list[int]:
    """Parse 1-based ids '1, 3' or '1-3' (each from 1 to n) into a sorted list of 0-based indices."""
    out = set()
    words = [w for w in re.split(r"[\s,;]+", str(text or "").strip()) if w]
    if not words:
        raise ValueError(f"give the clusters to keep, numbered 1 to {n}, e.g. '1' or '1, 3'")
    for w in words:
        a, sep, b = w.partition("-")
        try:
            lo, hi = (int(a), int(b)) if sep else (int(a), int(a))
        except ValueError:
            raise ValueError(f"'{w}' is not a cluster number or range (e.g. '1, 3' or '2-4')") from None
        if not (1 <= lo <= hi <= n):
            raise ValueError(f"cluster '{w}' does not exist: clusters are numbered 1 to {n}")
        out.update(range(lo - 1, hi))
    return sorted(out)


def standardise(z: np.ndarray) -> np.ndarray:
    """(z − mean) / sd per column; a column without spread is only centred."""
    z = np.asarray(z, dtype=np.float64)
    sd = z.std(axis=0)
    return (z - z.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _inUnits(z: np.ndarray, units: str) -> np.ndarray:
    if units not in UNITS:
        raise ValueError(f"units must be one of {UNITS}, got {units!r}")
    return standardise(z) if units == "sd" else np.asarray(z, dtype=np.float64)


def box_mask(z: np.ndarray, ranges: dict[int, tuple[float, float]], units: str = "latent") -> np.ndarray:
    """Particles inside every range (min ≤ z_d ≤ max, bounds included); `units` 'sd' compares standardised z."""
    x = _inUnits(z, units)
    keep = np.ones(len(x), dtype=bool)
    for d, (lo, hi) in ranges.items():
        keep &= (x[:, d] >= lo) & (x[:, d] <= hi)
    return keep


def sphere_mask(z: np.ndarray, centre: np.ndarray, radius: float, units: str = "latent") -> np.ndarray:
    """Particles within `radius` (Euclidean, bound included) of `centre`, both in `units`."""
    x = _inUnits(z, units)
    return np.sqrt(((x - np.asarray(centre, dtype=np.float64)) ** 2).sum(axis=1)) <= radius


def kmeans(z: np.ndarray, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 300,
           units: str = "latent") -> tuple[np.ndarray, np.ndarray]:
    """k-means on the latents (best of `n_init` k-means++ seeded Lloyd runs, deterministic for a seed).

    Returns 0-based labels (N,) and centres (k, K) in `units`, with clusters numbered by increasing centre along
    latent dimension 1 (then 2, ...), so the numbering does not depend on the random initialisation.
    """
    x = _inUnits(z, units)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters from {n} particles")
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, n_init)):
        labels, c = lloyd(x, k, rng, max_iter)
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[0] - 1e-12:
            best = (inertia, labels, c)
    _, labels, c = best
    order = np.lexsort(c.T[::-1])  # by dimension 1, ties by dimension 2, ...
    rank = np.empty(k, dtype=int)
    rank[order] = np.arange(k)
    return rank[labels], c[order]


def cluster_mask(labels: np.ndarray, keep: list[int]) -> np.ndarray:
    """Particles whose 0-based cluster label is in `keep`."""
    return np.isin(np.asarray(labels), np.asarray(keep, dtype=int))


def plot_selection(z: np.ndarray, keep: np.ndarray, path: str | os.PathLike, title: str = "",
                   centres: np.ndarray | None = None, max_dims: int = 4) -> str:
    """Latent scatter with the kept particles highlighted: pairs of the first `max_dims` dimensions (one
    histogram of all vs kept when there is a single dimension); `centres` (raw latent units) are marked and
    numbered from 1."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    z = np.asarray(z, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    k = min(z.shape[1], max_dims)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    if not pairs:
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
        bins = np.histogram_bin_edges(z[:, 0], bins=50)
        ax.hist(z[:, 0], bins=bins, color="0.7", label="all")
        ax.hist(z[keep, 0], bins=bins, color="C3", label="kept")
        ax.set_xlabel("latent 1")
        ax.legend(fontsize=8)
        axes = [ax]
    else:
        ncol = min(len(pairs), 3)
        nrow = int(np.ceil(len(pairs) / ncol))
        fig, grid = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.2 * nrow), dpi=100, squeeze=False)
        axes = list(grid.ravel())
        for ax in axes[len(pairs):]:
            ax.axis("off")
        size = max(1.0, min(8.0, 4000.0 / max(1, len(z))))
        for ax, (i, j) in zip(axes, pairs):
            ax.scatter(z[~keep, i], z[~keep, j], s=size, c="0.7", lw=0, label="left out")
            ax.scatter(z[keep, i], z[keep, j], s=size, c="C3", lw=0, label="kept")
            if centres is not None:
                for c, point in enumerate(np.asarray(centres)):
                    ax.plot(point[i], point[j], "k+", ms=10)
                    ax.annotate(str(c + 1), (point[i], point[j]), xytext=(3, 3), textcoords="offset points",
                                fontsize=9, weight="bold")
            ax.set_xlabel(f"latent {i + 1}", fontsize=8)
            ax.set_ylabel(f"latent {j + 1}", fontsize=8)
        axes[0].legend(fontsize=7, markerscale=2)
    fig.suptitle(title or f"{int(keep.sum())} of {len(keep)} particles kept", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
