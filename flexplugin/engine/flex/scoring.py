"""How well a trained flex model recovered a known motion: latent read-out and per-state map agreement.

Benchmark data sets (engine/pdb_motion.py, engine/simulate.py) know each particle's motion coordinate and the
true map of each state. Two scores, both blind to the latent's arbitrary sign, scale and rotation:

- `readout_rho`: the cross-validated |Spearman ρ| of the best linear read-out of the truth from the latents
  (fit on one half of the particles, scored on the other), so a K-dimensional latent is not penalised for
  spreading the motion over several axes, and over-fitting noise is not rewarded;
- `state_metrics`: per true state, the masked correlation of the generated map and of the consensus with
  the truth (the generated map must beat the consensus), and whether the generated series runs through
  the states in order.

numpy and scipy only: scoring a result must not need torch or a GPU.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..errors import InputError

__all__ = ["masked_corr", "readout_rho", "spearman", "state_metrics"]


def _pearson(a: np.ndarray, b: np.ndarray, w: np.ndarray | None = None) -> float:
    """(Weighted) Pearson correlation of two flat arrays; 0 when either is constant (no information)."""
    w = np.ones_like(a) if w is None else w
    sw = w.sum()
    if sw <= 0:
        return 0.0
    da, db = a - (w * a).sum() / sw, b - (w * b).sum() / sw
    va, vb = (w * da * da).sum(), (w * db * db).sum()
    if va == 0 or vb == 0 or va <= 1e-12 * (w * a * a).sum() or vb <= 1e-12 * (w * b * b).sum():
        return 0.0
    return float((w * da * db).sum() / np.sqrt(va * vb))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    return _pearson(rankdata(np.asarray(a, np.float64)), rankdata(np.asarray(b, np.float64)))


def _linear_fit_predict(z_fit: np.ndarray, y_fit: np.ndarray, z_new: np.ndarray) -> np.ndarray:
    """Least-squares y ≈ [z, 1]·β on one set, evaluated on another."""
    beta, *_ = np.linalg.lstsq(np.c_[z_fit, np.ones(len(z_fit))], y_fit, rcond=None)
    return np.c_[z_new, np.ones(len(z_new))] @ beta


def readout_rho(z: np.ndarray, truth: np.ndarray, seed: int = 0) -> float:
    """Cross-validated |Spearman ρ| of the best linear read-out of `truth` (N,) from latents `z` (N, K).

    The particles are split at random into two halves; β is fitted on one half and the prediction scored
    on the other, both ways, and the two |ρ| are averaged. 1 = the motion is a linear function of the latents
    (any sign, scale or rotation), ~0 = no linear trace of it."""
    z = np.asarray(z, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    y = np.asarray(truth, dtype=np.float64).ravel()
    if z.ndim != 2 or len(z) != len(y):
        raise InputError(f"latents {z.shape} and truth {y.shape} do not match: need (N, K) and (N,)")
    if len(y) < 2 * (z.shape[1] + 2):
        raise InputError(f"{len(y)} particles are too few to fit and score a read-out of {z.shape[1]} latents")
    if not (np.isfinite(z).all() and np.isfinite(y).all()):
        raise InputError("latents or truth contain NaN/inf")
    perm = np.random.default_rng(seed).permutation(len(y))
    halves = perm[: len(y) // 2], perm[len(y) // 2:]
    rhos = [abs(spearman(_linear_fit_predict(z[a], y[a], z[b]), y[b])) for a, b in (halves, halves[::-1])]
    return float(np.mean(rhos))


def masked_corr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two maps weighted by a (soft) mask: agreement where the mask says to look."""
    return _pearson(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64),
                    np.clip(np.ravel(mask).astype(np.float64), 0, None))


def state_metrics(generated: np.ndarray, truth_states: np.ndarray, consensus: np.ndarray,
                  mask: np.ndarray) -> dict[str, Any]:
    """Per true state: masked correlation of the generated map and of the consensus with it, their difference.

    generated and truth_states are (S, m, m, m) series along the motion; the generated series may run either
    way (the latent's sign is arbitrary), so it is compared in the orientation that matches the truth best
    ("reversed"). "order_rho" is |Spearman| between the generated index and the index of its best-matching
    true state: 1 when the series runs through the states in order."""
    g, t, consensus, mask = (np.asarray(x) for x in (generated, truth_states, consensus, mask))
    if g.ndim != 4 or g.shape != t.shape or consensus.shape != g.shape[1:] or mask.shape != g.shape[1:]:
        raise InputError(f"need generated and true states (S, m, m, m) with consensus and mask (m, m, m); got "
                         f"{g.shape}, {t.shape}, {consensus.shape}, {mask.shape}")
    S = len(t)
    cc = np.array([[masked_corr(g[i], t[j], mask) for j in range(S)] for i in range(S)])  # generated × truth
    reversed_ = bool(np.trace(cc[::-1]) > np.trace(cc))
    gen_corr = np.diag(cc[::-1] if reversed_ else cc)
    cons_corr = np.array([masked_corr(consensus, t[j], mask) for j in range(S)])
    best = cc.argmax(1)
    gain = gen_corr - cons_corr
    return {"corr_generated": gen_corr.tolist(), "corr_consensus": cons_corr.tolist(), "gain": gain.tolist(),
            "mean_gain": float(gain.mean()), "min_gain": float(gain.min()), "reversed": reversed_,
            "best_match": best.tolist(), "order_rho": abs(spearman(np.arange(S), best)) if S > 1 else 1.0}
