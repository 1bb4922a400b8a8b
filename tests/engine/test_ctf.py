"""CTF against the closed formula (written out independently here) and analytic zero positions."""
import math

import numpy as np
import pytest
import torch

from flexplugin.engine.ctf import CTFParams, compute_ctf, electron_wavelength
from flexplugin.engine.fourier import freq_grid_2d


def _params(u, v, ang, kv=300.0, cs=2.7, ac=0.1, ps=0.0, b=0.0):
    t = lambda x: torch.tensor([float(x)])  # noqa: E731
    return CTFParams(t(u), t(v), t(ang), t(kv), t(cs), t(ac), t(ps), t(b))


def _relion_formula(kx, ky, u, v, ang, kv, cs, ac, ps, b):
    """RELION ctf.h, written out: deltaf = -(avg + dev·cos 2(θ-ang)); CTF = -sin(K1·deltaf·k² + K2·k⁴ - K5 - K3)."""
    lam = 12.2642598 / math.sqrt(kv * 1e3 * (1 + 0.978466e-6 * kv * 1e3))
    k2 = kx ** 2 + ky ** 2
    theta = np.arctan2(ky, kx)
    deltaf = -(0.5 * (u + v) + 0.5 * (u - v) * np.cos(2 * (theta - np.deg2rad(ang))))
    K1, K2 = math.pi * lam, math.pi / 2 * cs * 1e7 * lam ** 3
    K3 = math.atan(ac / math.sqrt(1 - ac * ac))
    return -np.sin(K1 * deltaf * k2 + K2 * k2 * k2 - np.deg2rad(ps) - K3) * np.exp(-b * k2 / 4)


def test_wavelength():
    assert electron_wavelength(300.0) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength(200.0) == pytest.approx(0.025079, abs=2e-6)


@pytest.mark.parametrize("u,v,ang,kv,cs,ac,ps,b", [
    (15000, 15000, 0, 300, 2.7, 0.1, 0, 0),
    (21000, 17500, 37, 300, 2.7, 0.07, 0, 0),
    (9000, 8000, 120, 200, 2.0, 0.1, 0, 50),
    (6000, 5800, -20, 300, 0.01, 0.1, 90, 0),  # phase plate
])
def test_matches_formula(u, v, ang, kv, cs, ac, ps, b):
    n, apix = 96, 1.3
    ours = compute_ctf(_params(u, v, ang, kv, cs, ac, ps, b), n, apix)[0].double().numpy()
    g = freq_grid_2d(n, dtype=torch.float64).numpy() / apix
    ref = _relion_formula(g[..., 1], g[..., 0], u, v, ang, kv, cs, ac, ps, b)
    assert np.abs(ours - ref).max() < 2e-3


def test_value_at_dc_is_amplitude_contrast():
    c = compute_ctf(_params(20000, 20000, 0, ac=0.1), 64, 1.0)[0]
    assert float(c[32, 0]) == pytest.approx(0.1, abs=1e-5)  # positive: protein stays bright


def test_zero_positions_and_astigmatism_axis():
    """Cs = 0, no amplitude contrast: zeros at k_n = sqrt(n / (λ Δf)); U lies along x at angle 0."""
    n, apix, U, V = 512, 1.0, 20000.0, 12000.0
    lam = electron_wavelength(300.0)
    for ang, (df_x, df_y) in ((0.0, (U, V)), (90.0, (V, U))):
        c = compute_ctf(_params(U, V, ang, cs=0.0, ac=0.0), n, apix)[0].double().numpy()
        line_x, line_y = c[n // 2, :], c[n // 2:, 0]  # +kx axis, +ky axis
        for line, df in ((line_x, df_x), (line_y, df_y)):
            k = np.arange(len(line)) / (n * apix)
            crossings = k[:-1][np.sign(line[:-1]) * np.sign(line[1:]) < 0]
            expected = np.sqrt(np.arange(1, 4) / (lam * df))
            np.testing.assert_allclose(crossings[:3], expected, atol=1.0 / (n * apix))


def test_defocus_u_below_v_is_the_same_ctf_turned():
    """RELION allows U < V: it must equal the formula, i.e. (V, U) at the angle + 90°."""
    n, apix = 96, 1.3
    a = compute_ctf(_params(11000, 15000, 30), n, apix)[0]
    b = compute_ctf(_params(15000, 11000, 120), n, apix)[0]
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-5)
    g = freq_grid_2d(n, dtype=torch.float64).numpy() / apix
    ref = _relion_formula(g[..., 1], g[..., 0], 11000, 15000, 30, 300, 2.7, 0.1, 0, 0)
    assert np.abs(a.double().numpy() - ref).max() < 2e-3


def test_phase_flipped_and_bfactor():
    p = _params(15000, 14000, 10, b=100.0)
    c = compute_ctf(p, 64, 1.5)
    assert torch.allclose(compute_ctf(p, 64, 1.5, phase_flipped=True), c.abs())
    p0 = _params(15000, 14000, 10, b=0.0)
    k2 = (freq_grid_2d(64) / 1.5).square().sum(-1)
    assert torch.allclose(c, compute_ctf(p0, 64, 1.5) * torch.exp(-100.0 * k2 / 4), atol=1e-6)


def test_batched_shapes():
    t = torch.ones(5)
    p = CTFParams(t * 1e4, t * 1e4, t, t * 300, t * 2.7, t * 0.1, t * 0, t * 0)
    assert compute_ctf(p, 32, 2.0).shape == (5, 32, 17)
