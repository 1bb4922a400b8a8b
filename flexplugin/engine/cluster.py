"""k-means on latent coordinates (numpy only, no torch): shared by 3DVA display and the latent subset protocol."""
from __future__ import annotations

import numpy as np

from .errors import InputError

__all__ = ["lloyd", "kmeans"]


def lloyd(x: np.ndarray, k: int, rng: np.random.Generator, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """One k-means++ seeded Lloyd run on x (N, d); returns labels (N,) and centres (k, d).

    An empty cluster restarts at the worst-fitted point, so every cluster keeps at least one member."""
    n = len(x)
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centres.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.array(centres)
    labels = np.full(n, -1)
    for _ in range(max_iter):
        dist = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        new = dist.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                c[j] = members.mean(0)
            else:
                far = int(dist[np.arange(n), labels].argmax())
                c[j] = x[far]
                labels[far] = j
    return labels, c


def kmeans(x: np.ndarray, k: int, seed: int = 0, max_iter: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding (deterministic for a seed); returns labels (N,), centres (k, d)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise InputError(f"cannot make {k} clusters from {n} particles")
    return lloyd(x, k, np.random.default_rng(seed), max_iter)
