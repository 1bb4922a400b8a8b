"""Seeds from linear methods: the arch of a curved motion is removed, independent components are kept."""
from __future__ import annotations

import numpy as np

from flexplugin.engine.flex.seeding import LATENT_SD, normalize_init_latents, remove_arches


def _pca(x: np.ndarray, k: int) -> np.ndarray:
    """Top-k principal-component coordinates of the rows of x (an independent linear method, as 3DVA is)."""
    x = x - x.mean(0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    return u[:, :k] * s[:k]


def test_pca_of_a_curved_path_has_an_arch_and_it_is_removed():
    """Points along a bent 1-D path in 50-D (a hinge: the direction turns by 90°) have a PCA second component that
    is a quadratic in the first; after remove_arches the second column no longer follows the motion's ends."""
    rng = np.random.default_rng(0)
    t = rng.uniform(-1, 1, 3000)
    a, b = np.zeros(50), np.zeros(50)
    a[0], b[1] = 1.0, 1.0
    path = np.outer(np.cos(t * np.pi / 4), a) + np.outer(np.sin(t * np.pi / 4), b)  # an arc of a circle
    x = path + 0.01 * rng.normal(size=(3000, 50))
    z = _pca(x, 2)
    ends = np.abs(t)
    assert abs(np.corrcoef(z[:, 1], ends)[0, 1]) > 0.9  # the arch: component 2 tells the ends from the middle
    d = remove_arches(z)
    assert abs(np.corrcoef(d[:, 1], ends)[0, 1]) < 0.1
    assert d[:, 1].std() < 0.3 * z[:, 1].std()
    assert np.allclose(d[:, 0], z[:, 0] - z[:, 0].mean())  # the first column is only centred


def test_an_independent_component_is_kept():
    """Two independent motions: the second column is unchanged (up to the fit's noise), so is their ratio."""
    rng = np.random.default_rng(1)
    z = np.c_[2.0 * rng.normal(size=2000), 0.5 * rng.uniform(-1, 1, 2000), rng.normal(size=2000)]
    d = remove_arches(z)
    for j in range(3):
        assert np.corrcoef(d[:, j], z[:, j])[0, 1] > 0.995
    s = normalize_init_latents(z, 3)
    assert abs(s.std(0)[0] - LATENT_SD) < 1e-3
    assert abs(s.std(0)[1] / s.std(0)[0] - z[:, 1].std() / z[:, 0].std()) < 0.01


def test_dearch_can_be_turned_off():
    rng = np.random.default_rng(2)
    t = rng.uniform(-1, 1, 1000)
    z = np.c_[t, t ** 2]  # (no clipping at ±1.5 for a uniform column)
    kept = normalize_init_latents(z, 2, dearch=False)
    assert np.corrcoef(kept[:, 1], t ** 2)[0, 1] > 0.999
    assert normalize_init_latents(z, 2)[:, 1].std() < 1e-3
