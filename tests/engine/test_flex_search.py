"""Latent search pieces: the row slicer equals the library-based band slicer, grids span the latents, and the
spread restored after a posterior mean keeps order and relative variances."""
import pytest
import torch

from flexplugin.engine.flex.search import (
    SearchTables,
    latent_grid,
    slice_rows,
    slice_scores,
)
from flexplugin.engine.flex.train import keep_spread
from flexplugin.engine.geometry import euler_to_matrix
from flexplugin.engine.projector import prepare_volume_ft
from flexplugin.engine.va3d.slicing import make_band, slice_band


@pytest.mark.parametrize("kmax", [0.8, 1.0])
def test_slice_rows_equals_slice_band(kmax):
    """Identical samples inside Nyquist; at full Nyquist (1.0) the samples on the grid's last plane read the
    edge voxel where the library reads zero beyond it, so those are left out (the search's band never gets
    there: its working box keeps k_max a voxel inside Nyquist)."""
    torch.manual_seed(0)
    m, g = 20, 7
    spectra = prepare_volume_ft(torch.randn(g, m, m, m), pad=2)
    band = make_band(m, "cpu", kmax_px=kmax * m / 2)
    rot = euler_to_matrix(torch.rand(9) * 360, torch.rand(9) * 180, torch.rand(9) * 360)
    ref = slice_band(spectra, rot, band)
    got = slice_rows(spectra.reshape(g, -1).T.contiguous(), 2 * m, rot, band)
    assert got.shape == ref.shape == (9, g, band.size)
    inside = band.k2d.norm(dim=-1) * m <= 0.45 * m  # k2d in cycles per pixel
    assert float((got - ref)[..., inside].abs().max() / ref.abs().max()) < 1e-5


def test_slice_scores_match_the_exact_chi2():
    """Both terms of the whitened χ² equal the ones formed from the exact slices (slice_rows)."""
    torch.manual_seed(1)
    m, g, b = 24, 9, 6
    x = torch.stack(torch.meshgrid(*[torch.arange(m) - m / 2] * 3, indexing="ij"), -1)
    centres = torch.rand(12, 3) * m / 2 - m / 4  # a particle of Gaussian atoms in the middle half of the box

    def blobs(shift: float) -> torch.Tensor:  # candidate g: the first four atoms moved by `shift` px along z
        c = centres.clone()
        c[:4, 0] += shift
        return torch.exp(-((x[..., None, :] - c) ** 2).sum(-1) / (2 * 1.5 ** 2)).sum(-1)

    vols = torch.stack([blobs(0.5 * (i - 4)) for i in range(g)])  # related candidates, as a decoded motion gives
    spectra = prepare_volume_ft(vols, pad=2)
    band = make_band(m, "cpu", kmax_px=0.8 * m / 2)
    rot = euler_to_matrix(torch.rand(b) * 360, torch.rand(b) * 180, torch.rand(b) * 360)
    s = slice_rows(spectra.reshape(g, -1).T.contiguous(), 2 * m, rot, band)  # (B, G, nb) exact
    a = torch.randn(b, band.size, dtype=torch.complex64)
    w = torch.rand(band.size) + 0.5
    y = a * s[:, 4] + 0.3 * torch.randn(b, band.size, dtype=torch.complex64) * s.abs().mean()
    exact = ((y[:, None] - a[:, None] * s).abs().square() * w).sum(-1)
    cross, power = slice_scores(SearchTables(spectra), rot, band, w * y.conj() * a, w * a.abs().square())
    ref_cross = (w * y.conj()[:, None] * a[:, None] * s).real.sum(-1)
    assert torch.allclose(cross, ref_cross, rtol=1e-4, atol=1e-4 * float(ref_cross.abs().max()))
    ref_power = (w * a.abs().square())[:, None].mul(s.abs().square()).sum(-1)
    assert torch.allclose(power, ref_power, rtol=1e-4)
    chi2 = power - 2 * cross + (w * y.abs().square()).sum(-1, keepdim=True)
    assert torch.allclose(chi2, exact, rtol=1e-3)
    assert torch.equal(exact.argmin(1), torch.full((b,), 4))  # and the data pick their own candidate


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
