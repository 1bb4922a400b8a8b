"""3D Flex generation and high-resolution reconstruction on the built-in example data (box 32)."""
import json
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from flexplugin.engine.errors import InputError
from flexplugin.engine.flex.generate import axis_series, load_model, points_from_particles, read_points
from flexplugin.engine.flex.mesh import build_mesh, save_mesh
from flexplugin.engine.flex.prep import PreparedParticles, prep_spec, prep_volume
from flexplugin.engine.flex.reconstruct import flex_reconstruct
from flexplugin.engine.flex.train import FlexTrainer, TrainConfig, normalize_init_latents
from flexplugin.engine.fourier import fsc_resolution
from flexplugin.engine.io import read_particles, read_volume, write_particles_star
from flexplugin.engine.simulate import SimConfig, build_object, render_volumes, simulate_dataset

CFG = SimConfig(n=1000, box=32, apix=4.0, snr=0.5, seed=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Example data at box 32 and a 16-epoch model seeded with a poor (|ρ| ≈ 0.8) coordinate."""
    from flexplugin.cli_flex import _write_outputs
    root = tmp_path_factory.mktemp("flexgen")
    d = root / "data"
    simulate_dataset(CFG, d, progress=lambda s: None)
    ps = read_particles(d / "particles.star")
    gt = pd.read_csv(d / "ground_truth.csv").set_index("rlnImageId").loc[ps.ids, "motion"].to_numpy()
    vol, apix = read_volume(d / "consensus.mrc")
    mesh = build_mesh(vol, apix, cells=8)
    save_mesh(mesh, root / "mesh.pkl")
    spec = prep_spec(32, 4.0, None, 32)
    rng = np.random.default_rng(0)
    init = normalize_init_latents(np.stack([gt + 0.45 * rng.normal(size=len(gt)), rng.normal(size=len(gt))], 1), 2)
    # a poor seed wants big latent steps (README: 0.80 → 0.94 with 0.05)
    tr = FlexTrainer(PreparedParticles(ps, spec), prep_volume(vol, spec), mesh, TrainConfig(k=2, lr_latent=0.05),
                     "cpu", init)
    out = root / "train"
    out.mkdir()
    tr.fit(out, progress=lambda s: None)
    _write_outputs(tr, ps, out, str(root / "mesh.pkl"))
    # a soft mask around what moves (arm and head): where the end states differ
    s0, s8 = read_volume(d / "gt" / "state_000.mrc")[0], read_volume(d / "gt" / "state_008.mrc")[0]
    diff = ndimage.gaussian_filter(np.abs(s0 - s8), 1.0)
    moving = ndimage.gaussian_filter(ndimage.binary_dilation(diff > 0.15 * diff.max(), iterations=2).astype(np.float32), 1.0)
    return {"root": root, "data": d, "ps": ps, "gt": gt, "consensus": vol, "model": load_model(out), "moving": moving}


def _cc(a, b, m):
    return float(np.corrcoef((a * m).ravel(), (b * m).ravel())[0, 1])


def test_generated_volumes_match_true_states_at_the_ends(trained):
    model, gt, moving = trained["model"], trained["gt"], trained["moving"]
    obj = build_object(CFG)
    edges = np.quantile(gt, np.linspace(0, 1, 6))
    for lo, hi in ((edges[0], edges[1]), (edges[-2], edges[-1])):  # the two end bins of 5
        sel = (gt >= lo) & (gt <= hi)
        point = points_from_particles(model, trained["ps"].ids[sel].tolist())
        gen = model.volumes(point)[0]
        truth = render_volumes(obj, np.array([gt[sel].mean()]), CFG.box, CFG.apix, CFG.atom_sigma_A)[0]
        cc_gen, cc_cons = _cc(gen, truth, moving), _cc(trained["consensus"], truth, moving)
        assert cc_gen > cc_cons + 0.03, (cc_gen, cc_cons)


def test_generation_is_deterministic_and_conserves_mass(trained):
    model = trained["model"]
    pts = np.array([[0.3, -0.2], [-0.5, 0.4]], np.float32)
    a, b = model.volumes(pts), model.volumes(pts)
    np.testing.assert_array_equal(a, b)
    canon = model.canonical.cpu().numpy()
    for v in a:  # backward warp: mass changes by det(I + ∇u), which the rigidity prior keeps near 1
        assert abs(v.sum() - canon.sum()) < 0.03 * abs(canon.sum())
    full = model.volumes(pts[:1], m=48)
    assert full.shape == (1, 48, 48, 48)
    assert abs(full.sum() * (32 / 48) ** 3 - a[0].sum()) < 0.03 * abs(a[0].sum())


def test_axis_series_and_points(trained, tmp_path):
    model = trained["model"]
    series = axis_series(model.latents, 41)
    assert len(series) == 2 and series[0].shape == (41, 2)
    lo, hi = np.percentile(model.latents[:, 0], [1, 99])
    assert series[0][0, 0] == pytest.approx(lo) and series[0][-1, 0] == pytest.approx(hi)
    assert series[0][20, 0] == pytest.approx((lo + hi) / 2)  # odd count: the middle frame is the centre
    (tmp_path / "p.csv").write_text("0.1,0.2\n-0.3,0.4\n")
    assert read_points(tmp_path / "p.csv", 2).shape == (2, 2)
    (tmp_path / "bad.csv").write_text("0.1,0.2,0.3\n")
    with pytest.raises(InputError, match="K=2"):
        read_points(tmp_path / "bad.csv", 2)
    with pytest.raises(InputError, match="not in the model"):
        points_from_particles(model, [999999])


def test_flex_reconstruction_beats_rigid_in_the_moving_region(trained):
    r = flex_reconstruct(trained["model"], trained["ps"], iterations=10, mask=trained["moving"])
    # half-map FSC inside the mask around the moving domain (box 32, 4 Å/px: Nyquist 8 Å). At 0.143 both curves
    # reach the last shells (measured 8.50 vs 8.65 Å), so that criterion only may not be worse; the 0.5
    # criterion, still inside the band, is where the difference shows
    assert r.res_flex <= r.res_noflex + 0.1, (r.res_flex, r.res_noflex)
    res05_flex, res05_noflex = fsc_resolution(r.fsc_flex, 4.0, 0.5), fsc_resolution(r.fsc_noflex, 4.0, 0.5)
    assert res05_flex < res05_noflex - 0.3, (res05_flex, res05_noflex)  # measured 9.9 vs 11.5 Å
    assert r.fsc_flex[1:].sum() > r.fsc_noflex[1:].sum()
    # the flex map is closer to the true middle state where things move
    truth = read_volume(trained["data"] / "gt" / "state_004.mrc")[0]
    assert _cc(r.flex_map, truth, trained["moving"]) > _cc(r.noflex_map, truth, trained["moving"]) + 0.03
    for name, hist in r.objective.items():
        assert hist[-1] < hist[0], name  # L-BFGS decreased the objective from the Wiener start


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "flexplugin.cli", *args], capture_output=True, text=True)


def test_cli_generate_and_reconstruct(trained, tmp_path):
    train = trained["root"] / "train"
    r = _cli("flex-generate", "--model", str(train), "--out", str(tmp_path / "gen"), "--frames", "5",
             "--atlas-grid", "4", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    g = tmp_path / "gen"
    assert sorted(p.name for p in (g / "series_00").glob("vol_*.mrc")) == [f"vol_{i:03d}.mrc" for i in range(5)]
    pts = pd.read_csv(g / "series_00" / "points.csv")
    assert len(pts) == 5 and pts["volume"].iloc[0] == "vol_000.mrc"
    with mrcfile.open(g / "series_01" / "vol_004.mrc") as m:
        assert b"flexplugin z=" in bytes(m.header.label[1]) and m.voxel_size.x == pytest.approx(4.0)
    for f in ("atlas.png", "series_00.png", "series_01.png", "generate.json"):
        assert (g / f).exists(), f
    (tmp_path / "z.csv").write_text("0.2,0.1\n-0.2,0.0\n0.0,0.3\n")
    r = _cli("flex-generate", "--model", str(train / "model.pt"), "--out", str(tmp_path / "pts"), "--points",
             str(tmp_path / "z.csv"), "--box", "full", "--no-atlas", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "pts").glob("vol_*.mrc"))) == 3
    r = _cli("flex-generate", "--model", str(train), "--out", str(tmp_path / "ids"), "--from-particles", "1,2,3",
             "--no-atlas", "--device", "cpu")
    assert r.returncode == 0 and (tmp_path / "ids" / "vol_000.mrc").exists()
    r = _cli("flex-generate", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "model not found" in r.stderr
    # reconstruction CLI on a 200-particle subset (outputs and bookkeeping; accuracy is tested above)
    ps = trained["ps"]
    sub = ps.table.iloc[:200].copy()
    write_particles_star(tmp_path / "sub.star", sub, ps.optics)
    r = _cli("flex-reconstruct", "--model", str(train), "--particles", str(tmp_path / "sub.star"), "--out",
             str(tmp_path / "rec"), "--iterations", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "ETA" in r.stdout
    for f in ("flex_map.mrc", "flex_half_A.mrc", "flex_half_B.mrc", "noflex_map.mrc", "noflex_half_A.mrc",
              "noflex_half_B.mrc", "fsc.txt", "fsc.png", "maps.png", "reconstruct.json"):
        assert (tmp_path / "rec" / f).exists(), f
    info = json.loads((tmp_path / "rec" / "reconstruct.json").read_text())
    assert info["particles"] == 200 and info["crop"] == 32


class _Quadratic:
    """A stand-in for a half-set problem: ½‖A V − b‖² with a fixed random A, gradient accumulated in V.grad."""

    def __init__(self, n: int = 6, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(3 * n, n, generator=g)
        self.b = torch.randn(3 * n, generator=g)

    def objective(self, V, flex, lam):
        loss = 0.5 * (self.A @ V - self.b).square().sum()
        loss.backward()
        return loss.detach()


def test_lbfgs_report_says_when_the_evaluation_budget_stopped_it():
    """torch's L-BFGS stops at 1.25 × max_iter evaluations; the log must not claim iterations that did not run."""
    from flexplugin.engine.flex.reconstruct import _solve
    lines = []
    V, hist = _solve(_Quadratic(), torch.zeros(6), True, 2, 0.0, "solve", lines.append)
    assert "stopped at iteration 1" in lines[-1] and "evaluation budget 2" in lines[-1], lines[-1]
    lines.clear()
    V, hist = _solve(_Quadratic(), torch.zeros(6), True, 40, 0.0, "solve", lines.append)
    assert "evaluation budget" not in lines[-1], lines[-1]  # a 6-unknown quadratic converges within 40 iterations
    A, b = _Quadratic().A, _Quadratic().b
    np.testing.assert_allclose(V.numpy(), torch.linalg.lstsq(A, b[:, None]).solution[:, 0].numpy(), atol=1e-4)
