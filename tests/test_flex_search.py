"""Latent search pieces: the row slicer equals the library-based band slicer, grids span the latents, and the
spread restored after a posterior mean keeps order and relative variances."""
import torch

from flexplugin.engine.flex.search import latent_grid, slice_rows
from flexplugin.engine.flex.train import keep_spread
from flexplugin.engine.geometry import euler_to_matrix
from flexplugin.engine.projector import prepare_volume_ft
from flexplugin.engine.va3d.slicing import make_band, slice_band


def test_slice_rows_equals_slice_band():
    torch.manual_seed(0)
    m, g = 20, 7
    spectra = prepare_volume_ft(torch.randn(g, m, m, m), pad=2)
    band = make_band(m, "cpu", kmax_px=0.8 * m / 2)
    rot = euler_to_matrix(torch.rand(9) * 360, torch.rand(9) * 180, torch.rand(9) * 360)
    ref = slice_band(spectra, rot, band)
    got = slice_rows(spectra.reshape(g, -1).T.contiguous(), 2 * m, rot, band)
    assert got.shape == ref.shape == (9, g, band.size)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_latent_grid_spans_the_latents():
    z = torch.randn(500, 2) * 0.4
    grid = latent_grid(z, 9)
    assert grid.shape == (81, 2)
    assert (grid.min(0).values <= torch.quantile(z, 0.005, dim=0)).all()
    assert (grid.max(0).values >= torch.quantile(z, 0.995, dim=0)).all()
    assert latent_grid(torch.randn(100, 3), 5).shape == (25, 3)


def test_keep_spread_restores_spread_and_keeps_order():
    before = torch.randn(300, 2) * torch.tensor([0.4, 0.1])
    shrunk = 0.2 * before + 0.05
    out = keep_spread(shrunk, before)
    assert torch.allclose(out.var(0).sum().sqrt(), before.var(0).sum().sqrt(), rtol=1e-4)
    assert torch.equal(out[:, 0].argsort(), before[:, 0].argsort())
    ratio = out.std(0)[1] / out.std(0)[0]
    assert abs(float(ratio) - float(before.std(0)[1] / before.std(0)[0])) < 1e-4
