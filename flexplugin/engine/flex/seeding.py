"""Initial latents from external coordinates (3DVA, cryoDRGN, PCA…): columns picked, checked, de-arched, scaled.

Linear methods describe one curved motion with several components: the second is then largely a quadratic
function of the first (the "arch" or "horseshoe" of PCA on a one-dimensional non-linear path; removed in
ecology by detrended correspondence analysis). 3DVA shows it on every benchmark data set: 69–79 % of the
second component's variance is a quadratic in the first (docs/flex_training.md). A 3D Flex decoder is
non-linear and needs no arch, but a seed that carries one keeps it: training deepens it into a V whose two
arms hold the two ends of the motion (adk-closure at box 128: |ρ| from the seed's 0.987 down to 0.962, while
the same data from random latents reach 0.995). So each later column keeps only what the earlier ones do not
explain up to second order; an independent motion loses (nearly) nothing.
"""
from __future__ import annotations

import numpy as np

from ..errors import InputError

__all__ = ["LATENT_SD", "normalize_init_latents", "remove_arches"]

# spread (sd) of the latents at the start: random ones are drawn with it, seeds are scaled to it; ±1.5 (the
# latent range) is then ±3.75 sd
LATENT_SD = 0.4


def remove_arches(z: np.ndarray) -> np.ndarray:
    """Centred copy of `z` (N, K) in which column j ≥ 1 is replaced by its residual after a least-squares fit
    on the earlier (already de-arched) columns, their squares and their products: the part of a component
    that is a smooth function of the earlier ones is dropped, the independent part is kept as it is."""
    z = np.asarray(z, dtype=np.float64)
    out = z - z.mean(0)
    for j in range(1, z.shape[1]):
        prev = out[:, :j]
        terms = [np.ones(len(z)), *prev.T, *(prev[:, a] * prev[:, b] for a in range(j) for b in range(a, j))]
        basis = np.stack(terms, 1)
        coef, *_ = np.linalg.lstsq(basis, out[:, j], rcond=None)
        out[:, j] = out[:, j] - basis @ coef
    return out


def normalize_init_latents(z: np.ndarray, k: int, idxs: list[int] | None = None, target_std: float = LATENT_SD,
                           names: list[str] | None = None, source: str = "initial latents",
                           dearch: bool = True) -> np.ndarray:
    """Pick K columns of external coordinates (e.g. 3DVA), centre them, remove arches (`remove_arches`, unless
    `dearch` is False) and scale them all by one factor, so that the widest has std `target_std`.

    3DVA coordinates have an arbitrary overall scale, but their relative variances say how much each component
    explains: scaling each column to the same spread made a weak (often noise) component as wide as the motion,
    half the latent plot noise. ±1.5 (the latent range) is ±3.75 sd of the widest column.
    A NaN/Inf or constant column would give NaN or empty latents: InputError naming `source` and the column
    (`names[i]` for input column i when given).
    """
    try:
        z = np.asarray(z, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{source} must hold numbers only") from None
    if z.ndim != 2 or not z.size:
        raise InputError(f"{source} must be an N×K array, got shape {z.shape}")
    if idxs is None and z.shape[1] < k:
        raise InputError(f"{source} has {z.shape[1]} coordinate column(s) but --k {k} needs {k}")
    idxs = list(range(k)) if idxs is None else idxs
    if len(idxs) != k or len(set(idxs)) != k:
        raise InputError(f"--init-idxs must name {k} distinct columns (one per latent, --k {k}), got {idxs}")
    if max(idxs) >= z.shape[1] or min(idxs) < 0:
        raise InputError(f"--init-idxs {idxs} out of range for the {z.shape[1]} coordinate columns of {source} "
                         f"(0-based: 0 to {z.shape[1] - 1})")
    sel = z[:, idxs]
    for j, i in enumerate(idxs):
        _check_seed_column(sel[:, j], f"{source}: column {names[i] if names else i}")
    sel = remove_arches(sel) if dearch else sel - sel.mean(0)
    return np.clip(sel / sel.std(0).max() * target_std, -1.5, 1.5).astype(np.float32)


def _check_seed_column(col: np.ndarray, what: str) -> None:
    """Refuse a seed column with NaN/Inf (NaN latents) or without variance (it cannot order the particles)."""
    bad = np.flatnonzero(~np.isfinite(col))
    if len(bad):
        raise InputError(f"{what} holds {col[bad[0]]} at row {bad[0]} (the first bad row); initial latents must be "
                         "finite numbers")
    if np.ptp(col) == 0:
        raise InputError(f"{what} is constant ({col[0]:g} in every row): a column without variance cannot seed a "
                         "latent; pick other columns with --init-idxs (0-based) or another file")
