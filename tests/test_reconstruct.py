"""Reconstruction of simulated particles recovers the ground-truth map (positive density, right scale)."""
import json

import numpy as np
import torch

from flexplugin.engine.fourier import fsc, fsc_resolution
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.reconstruct import reconstruct_particles


def test_recovers_ground_truth(rigid_data):
    ps = read_particles(rigid_data / "particles.star")
    r = reconstruct_particles(ps, batch_size=200)
    gt, apix = read_volume(rigid_data / "gt" / "state_000.mrc")
    curve = fsc(torch.tensor(r.full), torch.tensor(gt))
    res_vs_gt = fsc_resolution(curve, apix, 0.5)
    # stated accuracy: at SNR 10 with 1000 particles (box 48, 2.5 Å/px) FSC(map, truth) ≥ 0.5 to 8 Å or better
    assert res_vs_gt <= 8.0, res_vs_gt
    # RELION contrast: protein bright in particles → positive density with the right amplitude
    scale = float((r.full * gt).sum() / (gt * gt).sum())
    assert 0.85 < scale < 1.15
    assert np.corrcoef(r.full.ravel(), gt.ravel())[0, 1] > 0.95
    # half sets come from rlnRandomSubset and the half-map FSC is consistent with the truth FSC
    assert sum(r.counts) == 1000 and abs(r.counts[0] - r.counts[1]) <= 1
    assert r.res_0143 < 9.0


def test_cli_reconstruct_outputs(rigid_data, tmp_path):
    from flexplugin.cli import main
    out = tmp_path / "rec"
    assert main(["reconstruct", "--particles", str(rigid_data / "particles.star"), "--mask",
                 str(rigid_data / "mask.mrc"), "--out", str(out), "--device", "cpu"]) == 0
    for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.txt", "fsc.png", "map_slices.png", "reconstruct.json"):
        assert (out / f).exists(), f
    summary = json.loads((out / "reconstruct.json").read_text())
    assert summary["particles"] == 1000 and summary["resolution_0143_A"] < 9.0
    data = np.loadtxt(out / "fsc.txt")
    assert data.shape == (25, 2) and data[0, 1] > 0.99


def test_shell_regulariser_is_noise_over_signal_power():
    """Independent check of the FSC → regulariser map: halves with known signal power τ², noise σ² and constant
    weight d give FSC = τ²/(τ² + σ²/d); the regulariser must be σ²/τ² (the Wiener term), and half of it for the
    map of both halves with their summed weight 2d."""
    from flexplugin.engine.reconstruct import shell_regulariser
    g = torch.Generator().manual_seed(0)
    n, d = 200_000, 4.0
    tau2 = torch.tensor([8.0, 1.0, 0.25, 0.05])
    sigma2 = 1.0
    cn = lambda: torch.complex(torch.randn(len(tau2), n, generator=g), torch.randn(len(tau2), n, generator=g)) / 2 ** .5
    S = cn() * tau2.sqrt()[:, None]
    halves = [S + cn() * (sigma2 / d) ** 0.5 for _ in range(2)]  # num/den of each half
    f = (halves[0] * halves[1].conj()).real.sum(1) / (halves[0].abs().square().sum(1) * halves[1].abs().square().sum(1)).sqrt()
    expected = sigma2 / tau2
    reg = shell_regulariser(f, torch.full_like(tau2, d))
    assert torch.allclose(reg, expected, rtol=0.05), (reg, expected)
    reg_full = shell_regulariser(f, torch.full_like(tau2, 2 * d), whole=True)
    assert torch.allclose(reg_full, expected, rtol=0.05), (reg_full, expected)
    # RELION's clamp: FSC ≤ 0 → FSC 1e-3 (strong but finite), FSC 1 → 0.999
    r = shell_regulariser(np.array([-0.2, 1.0]), np.array([1.0, 1.0]))
    assert torch.allclose(r, torch.tensor([0.999 / 1e-3, 0.001 / 0.999]), rtol=1e-4)
