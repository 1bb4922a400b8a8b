"""The built-in example data: deterministic by seed, the requested SNR, a real motion, sane files."""
import json

import numpy as np
import pandas as pd
import pytest

from flexplugin.engine.errors import InputError
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.simulate import SimConfig, build_object, project_atoms, render_volumes, simulate_dataset


def _make(tmp_path, name, **kw):
    out = tmp_path / name
    simulate_dataset(SimConfig(n=60, box=32, apix=4.0, stack_size=25, **kw), out, progress=lambda s: None)
    return out


def test_deterministic_by_seed(tmp_path):
    a, b, c = _make(tmp_path, "a", seed=5), _make(tmp_path, "b", seed=5), _make(tmp_path, "c", seed=6)
    pa, pb, pc = (read_particles(d / "particles.star") for d in (a, b, c))
    np.testing.assert_array_equal(pa.images(slice(None)), pb.images(slice(None)))
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnOriginXAngst"]
    pd.testing.assert_frame_equal(pa.table[cols], pb.table[cols])
    assert not np.allclose(pa.images([0]), pc.images([0]))
    for f in ("consensus.mrc", "mask.mrc", "gt/state_004.mrc"):
        np.testing.assert_array_equal(read_volume(a / f)[0], read_volume(b / f)[0])


def test_noise_seed_gives_noise_replicates(tmp_path):
    """A noise seed changes the noise alone: the same particles and clean images with fresh noise of the same sd."""
    a, b, a2 = (_make(tmp_path, k, seed=5, noise_seed=s) for k, s in (("a", 1), ("b", 2), ("a2", 1)))
    clean = _make(tmp_path, "clean", seed=5, snr=1e12)  # the noise sd scales with 1/√snr: the clean images
    pa, pb, pa2, pc = (read_particles(d / "particles.star") for d in (a, b, a2, clean))
    cols = ["rlnImageId", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnDefocusU", "rlnOriginXAngst",
            "rlnRandomSubset"]
    for p in (pb, pc):
        pd.testing.assert_frame_equal(pa.table[cols], p.table[cols])
    for f in ("consensus.mrc", "gt/state_004.mrc", "gt/moving_mask.mrc"):  # (their headers carry a time stamp)
        np.testing.assert_array_equal(read_volume(a / f)[0], read_volume(b / f)[0])
    assert (a / "ground_truth.csv").read_bytes() == (b / "ground_truth.csv").read_bytes()
    sd = json.loads((a / "simulation.json").read_text())["noise_sd"]
    assert json.loads((b / "simulation.json").read_text())["noise_sd"] == sd
    na, nb = pa.images(slice(None)) - pc.images(slice(None)), pb.images(slice(None)) - pc.images(slice(None))
    assert na.std() == pytest.approx(sd, rel=0.02) and nb.std() == pytest.approx(sd, rel=0.02)
    assert abs(np.corrcoef(na.ravel(), nb.ravel())[0, 1]) < 0.02  # 61,440 samples: independent noise
    np.testing.assert_array_equal(pa.images(slice(None)), pa2.images(slice(None)))
    with pytest.raises(InputError, match="noise-seed"):
        _make(tmp_path, "bad", noise_seed=-1)


def test_files_snr_and_ground_truth(tmp_path):
    d = _make(tmp_path, "d", snr=0.5)
    meta = json.loads((d / "simulation.json").read_text())
    ps = read_particles(d / "particles.star")
    imgs = ps.images(slice(None))
    # measured image variance = signal variance + noise variance, with noise at the requested SNR
    assert imgs.var(axis=(1, 2)).mean() == pytest.approx(meta["signal_var"] + meta["noise_sd"] ** 2, rel=0.05)
    assert meta["signal_var"] / meta["noise_sd"] ** 2 == pytest.approx(0.5)
    gt = pd.read_csv(d / "ground_truth.csv")
    assert gt["rlnImageId"].tolist() == ps.ids.tolist() and gt["motion"].between(-1, 1).all()
    states = pd.read_csv(d / "gt" / "states.csv")
    assert len(states) == 9 and states["motion"].iloc[4] == 0
    mask, _ = read_volume(d / "mask.mrc")
    s0, s8 = read_volume(d / "gt" / "state_000.mrc")[0], read_volume(d / "gt" / "state_008.mrc")[0]
    assert mask.min() >= 0 and mask.max() == 1
    # every state lies inside the mask; the two end states really differ
    for s in (s0, s8):
        assert (s * (mask < 0.01)).sum() < 0.01 * s.sum()
    assert np.corrcoef(s0.ravel(), s8.ravel())[0, 1] < 0.9
    # positive density, mass conserved by the rigid motions
    assert s0.sum() == pytest.approx(s8.sum(), rel=1e-3) and s0.min() >= 0


def test_core_fixed_arm_moves():
    cfg = SimConfig(box=64, apix=2.0)
    obj = build_object(cfg)
    pos = obj.atoms(np.array([-1.0, 0.0, 1.0]))
    nc = len(obj.core)
    assert np.allclose(pos[0, :nc], pos[2, :nc])
    moved = np.linalg.norm(pos[0, nc:] - pos[2, nc:], axis=1)
    assert moved.mean() > 5.0  # Å
    # the object stays inside the box in every state
    assert np.abs(pos).max() < 0.5 * cfg.box * cfg.apix - 3 * cfg.atom_sigma_A


def test_analytic_projection_matches_volume_sum():
    """Independent of the Fourier projector: a projection along z equals the volume summed along z."""
    cfg = SimConfig(box=48, apix=2.5)
    obj = build_object(cfg)
    t = np.array([0.3])
    vol = render_volumes(obj, t, cfg.box, cfg.apix, cfg.atom_sigma_A)[0]
    img = project_atoms(obj.atoms(t), np.eye(3)[None], np.zeros((1, 2)), cfg.box, cfg.apix, cfg.atom_sigma_A)[0]
    assert np.abs(img.numpy() - vol.sum(0)).max() < 1e-3 * vol.sum(0).max()


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="even box"):
        simulate_dataset(SimConfig(n=10, box=33), tmp_path / "x")
