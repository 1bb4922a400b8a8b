"""Fourier helpers checked against analytic results."""
import math

import numpy as np
import pytest
import torch

from flexplugin.engine.fourier import (
    butterworth_highpass,
    butterworth_lowpass,
    fourier_crop_2d,
    fourier_crop_3d,
    fourier_pad_2d,
    fsc,
    fsc_resolution,
    irfft2c,
    irfft3c,
    radius_2d,
    rfft2c,
    rfft3c,
    shift_phase_2d,
)


def _gauss2d(n, sigma, cx=0.0, cy=0.0, step=1.0):
    g = (torch.arange(n, dtype=torch.float64) - n // 2) * step
    y, x = torch.meshgrid(g, g, indexing="ij")
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))


def test_round_trips_and_centre():
    img = torch.randn(3, 32, 32, dtype=torch.float64)
    assert torch.allclose(irfft2c(rfft2c(img), 32), img)
    vol = torch.randn(16, 16, 16, dtype=torch.float64)
    assert torch.allclose(irfft3c(rfft3c(vol), 16), vol)
    # a delta at the centre has a flat, real, positive spectrum; DC sits at [N//2, 0]
    d = torch.zeros(32, 32, dtype=torch.float64)
    d[16, 16] = 1
    ft = rfft2c(d)
    assert torch.allclose(ft, torch.ones_like(ft))
    assert rfft2c(torch.ones(32, 32))[16, 0].real == pytest.approx(1024)


def test_fourier_crop_matches_coarser_sampling():
    """Cropping the spectrum of a band-limited Gaussian = sampling it on the coarser grid."""
    fine = _gauss2d(64, sigma=4.0)
    coarse = fourier_crop_2d(fine[None], 32)[0]
    ref = _gauss2d(32, sigma=2.0)  # same object in units of the coarse pixel; amplitude preserved
    assert torch.allclose(coarse, ref, atol=1e-6)
    vol = torch.exp(-((torch.arange(32.) - 16)[:, None, None] ** 2 + (torch.arange(32.) - 16)[None, :, None] ** 2
                      + (torch.arange(32.) - 16)[None, None, :] ** 2) / (2 * 9.0))
    vc = fourier_crop_3d(vol, 16)
    assert vc[8, 8, 8] == pytest.approx(1.0, abs=1e-3)
    assert torch.allclose(fourier_pad_2d(coarse[None], 64)[0], fine, atol=1e-5)


def test_shift_phase_integer_shift_is_roll():
    img = torch.randn(2, 32, 32, dtype=torch.float64)
    s = torch.tensor([[3.0, -2.0], [-5.0, 7.0]], dtype=torch.float64)
    out = irfft2c(rfft2c(img) * shift_phase_2d(32, s), 32)
    for b in range(2):
        ref = torch.roll(img[b], shifts=(int(s[b, 1]), int(s[b, 0])), dims=(0, 1))  # content moves by +s
        assert torch.allclose(out[b], ref, atol=1e-10)


def test_subpixel_shift_of_gaussian():
    img = _gauss2d(48, 3.0)[None]
    out = irfft2c(rfft2c(img) * shift_phase_2d(48, torch.tensor([[1.5, -2.25]], dtype=torch.float64)), 48)
    assert torch.allclose(out[0], _gauss2d(48, 3.0, 1.5, -2.25), atol=1e-6)


def test_butterworth_half_power_and_shape():
    k = torch.tensor([0.0, 0.1, 0.2, 0.4])
    lp = butterworth_lowpass(k, 0.2, 1.5)
    assert lp[0] == 1 and lp[2] ** 2 == pytest.approx(0.5) and lp[3] < lp[1]
    hp = butterworth_highpass(k, 0.2, 8)
    assert hp[0] == 0 and hp[2] ** 2 == pytest.approx(0.5) and hp[3] > 0.99 and hp[1] < 0.01


def test_fsc_identical_independent_and_resolution():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 32, 32, generator=g)
    assert np.allclose(fsc(a, a), 1, atol=1e-5)
    b = torch.randn(32, 32, 32, generator=g)
    c = fsc(a, b)
    assert len(c) == 17 and np.abs(c[6:]).max() < 0.1 and np.abs(c[1:]).mean() < 0.06
    # a synthetic curve crossing 0.143 exactly halfway between shells 8 and 9 of a 32 box at 2 Å/px
    curve = np.ones(17)
    curve[8], curve[9:] = 0.243, 0.043
    f = (8.5) / (32 * 2.0)
    assert fsc_resolution(curve, 2.0, 0.143) == pytest.approx(1 / f)
    assert fsc_resolution(np.ones(17), 2.0) == 4.0
    assert math.isinf(fsc_resolution(np.r_[1.0, np.zeros(16)], 2.0))


def test_radius_grid():
    r = radius_2d(8)
    assert r[4, 0] == 0 and r[4, 4] == pytest.approx(0.5) and r[0, 0] == pytest.approx(0.5)
