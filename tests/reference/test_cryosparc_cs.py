"""cryoSPARC .cs particle files (engine/cryosparc_cs.py) against independent references.

- Poses: cryoDRGN 4.3.1's own parse of `cryosparc_P12_J24_001_particles.cs` (its test data `pose.cs.pkl`:
  rotation matrices and shifts / box). That cryoDRGN's matrices are RELION's A (ours: geometry.euler_to_matrix_np)
  is checked first on its parse of a RELION file (`pose.star.pkl` from `FinalRefinement-...-PfCRT.star`).
- CTF and images: `empiar_10076_7.cs` against its matching STAR file `empiar_10076_7.star`.
- Round trip: a .cs written here from the simulated data set's STAR file (poses as rotation vectors by SciPy)
  reads back to the STAR file's particles; our latents written back as components_mode_* fields by uid.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from numpy.lib.recfunctions import repack_fields

from flexplugin.engine.cryosparc_cs import load_cs, read_cs_blocks, relion_angles, write_cs_latents
from flexplugin.engine.errors import InputError
from flexplugin.engine.geometry import euler_to_matrix_np
from flexplugin.engine.io import read_particles

from ..helpers.cs_files import star_to_cs
from ..helpers.refdata import CRYODRGN, sdist_file


def _dataset():
    """cryosparc-tools' Dataset (writing .cs files needs it; reading falls back to NumPy)."""
    return pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools not installed").Dataset


def _data(name: str) -> Path:
    return sdist_file(CRYODRGN, f"tests/data/{name}")


def test_cryodrgn_matrices_are_relion_A():
    """cryoDRGN's pose.star.pkl (its parse of a RELION file) holds RELION's A: so its .cs parse is a reference."""
    t = starfile.read(_data("FinalRefinement-OriginalParticles-PfCRT.star"), always_dict=True)
    t = next(iter(t.values()))
    rot, trans = pickle.load(open(_data("pose.star.pkl"), "rb"))
    A = euler_to_matrix_np(*(t[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    np.testing.assert_allclose(A, rot, atol=1e-5)
    np.testing.assert_allclose(trans * 300, t[["rlnOriginX", "rlnOriginY"]].to_numpy(float), atol=1e-4)


def test_poses_match_cryodrgn_parse():
    """Our RELION angles of a real cryoSPARC refinement's poses give cryoDRGN's matrices, and shifts its trans."""
    a = load_cs(_data("cryosparc_P12_J24_001_particles.cs"))
    rot, trans = pickle.load(open(_data("pose.cs.pkl"), "rb"))
    A = euler_to_matrix_np(*relion_angles(np.asarray(a["alignments3D/pose"], float)))
    assert len(A) == len(rot) == 2019
    np.testing.assert_allclose(A, rot, atol=2e-5)
    D = int(a["blob/shape"][0][0])
    np.testing.assert_allclose(trans * D, np.asarray(a["alignments3D/shift"], float), atol=1e-4)


def test_ctf_and_images_match_star():
    """empiar_10076_7.cs reads to the same CTF, pixel size, box and images as its STAR file."""
    cs, st = read_particles(_data("empiar_10076_7.cs")), read_particles(_data("empiar_10076_7.star"))
    assert (cs.apix, cs.box) == pytest.approx((st.apix, st.box), rel=1e-5)
    for c in ("rlnDefocusU", "rlnDefocusV", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        np.testing.assert_allclose(cs.table[c].to_numpy(float), st.table[c].to_numpy(float), rtol=1e-6)
    # the STAR file rounds the angle to 5.28 degrees
    np.testing.assert_allclose(cs.table["rlnDefocusAngle"].to_numpy(float), 5.28, atol=5e-3)
    assert list(cs.table["rlnImageName"]) == list(st.table["rlnImageName"])
    rows = np.arange(len(cs))
    np.testing.assert_array_equal(np.asarray(cs.images(rows)), np.asarray(st.images(rows)))


def test_round_trip_and_latents_back(small_flex_data, tmp_path):
    """A .cs of the simulated set reads back to its STAR file's poses, shifts, CTF and halves; latents written
    back as components_mode_* fields land on the right uids."""
    Dataset = _dataset()
    (tmp_path / "stacks").symlink_to(small_flex_data / "stacks")
    cs_path = star_to_cs(small_flex_data / "particles.star", tmp_path / "particles.cs")
    cs, st = read_particles(cs_path), read_particles(small_flex_data / "particles.star")
    rows = np.arange(len(st))
    np.testing.assert_allclose(cs.rotations(rows).numpy(), st.rotations(rows).numpy(), atol=1e-5)
    np.testing.assert_allclose(cs.shifts_px(rows).numpy(), st.shifts_px(rows).numpy(), atol=1e-4)
    for f in ("defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift"):
        np.testing.assert_allclose(getattr(cs.ctf_params(rows), f), getattr(st.ctf_params(rows), f),
                                   rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(cs.images(rows[:5]), st.images(rows[:5]))
    assert sorted(np.unique(cs.half_sets())) == [1, 2]
    # latents of every other particle, in a shuffled order, back by uid
    ids = np.random.default_rng(1).permutation(np.arange(1, len(st) + 1, 2))
    z = np.stack([ids * 0.5, -ids.astype(float)], 1)
    out = write_cs_latents(cs_path, ids, z, tmp_path / "latents.cs")
    d, src = Dataset.load(out), load_cs(cs_path)
    np.testing.assert_array_equal(d["uid"], src["uid"][ids - 1])
    for k in range(2):
        np.testing.assert_array_equal(d[f"components_mode_{k}/component"], k)
        np.testing.assert_allclose(d[f"components_mode_{k}/value"], z[:, k].astype(np.float32))
    np.testing.assert_allclose(d["alignments3D/pose"], src["alignments3D/pose"][ids - 1])
    with pytest.raises(InputError, match="ids are its rows"):
        write_cs_latents(cs_path, np.array([len(st) + 1]), np.zeros((1, 2)), tmp_path / "bad.cs")


def test_missing_field_named(tmp_path, small_flex_data):
    (tmp_path / "stacks").symlink_to(small_flex_data / "stacks")
    drop = star_to_cs(small_flex_data / "particles.star", tmp_path / "a.cs",
                      lambda a: repack_fields(a[[n for n in a.dtype.names if n != "blob/psize_A"]]))
    with pytest.raises(InputError, match="no blob/psize_A field"):
        read_cs_blocks(drop)
    good = read_cs_blocks(star_to_cs(small_flex_data / "particles.star", tmp_path / "b.cs"))
    assert isinstance(good["particles"], pd.DataFrame) and len(good["particles"]) == 120


def test_3dva_on_cs_equals_star(small_flex_data, tmp_path):
    """`flexplugin 3dva` on the .cs gives the STAR run's latents (same particles, same ids), plus latents.cs."""
    Dataset = _dataset()

    from flexplugin.cli import main
    from flexplugin.engine.latents import read_latents
    (tmp_path / "stacks").symlink_to(small_flex_data / "stacks")
    cs_path = star_to_cs(small_flex_data / "particles.star", tmp_path / "particles.cs")
    lat = {}
    for name, parts in (("star", small_flex_data / "particles.star"), ("cs", cs_path)):
        out = tmp_path / name
        main(["3dva", "--particles", str(parts), "--mask", str(small_flex_data / "mask.mrc"), "--volume",
              str(small_flex_data / "consensus.mrc"), "--out", str(out), "--k", "2", "--iterations", "2",
              "--filter-res", "12", "--device", "cpu", "--threads", "1"])
        lat[name] = read_latents(out / "latents.csv")
    np.testing.assert_array_equal(lat["cs"].ids, lat["star"].ids)
    np.testing.assert_allclose(lat["cs"].z, lat["star"].z, rtol=1e-3, atol=1e-4)
    d = Dataset.load(tmp_path / "cs" / "latents.cs")
    np.testing.assert_array_equal(d["uid"], load_cs(cs_path)["uid"][lat["cs"].ids - 1])
    np.testing.assert_allclose(d["components_mode_1/value"], lat["cs"].z[:, 1], rtol=1e-6)
    assert not (tmp_path / "star" / "latents.cs").exists()
    assert (tmp_path / "cs" / "particles_3dva.star").exists()


def test_flex_train_on_cs_writes_latents_cs(small_flex_data, tmp_path):
    """flex-train on a .cs (one short epoch) writes latents.cs: its uids those of latents.csv's ids."""
    Dataset = _dataset()
    from flexplugin.cli import main
    from flexplugin.engine.latents import read_latents
    (tmp_path / "stacks").symlink_to(small_flex_data / "stacks")
    cs_path = star_to_cs(small_flex_data / "particles.star", tmp_path / "particles.cs")
    main(["flex-mesh", "--volume", str(small_flex_data / "consensus.mrc"), "--cells", "6", "--out",
          str(tmp_path / "mesh")])
    main(["flex-train", "--particles", str(cs_path), "--volume", str(small_flex_data / "consensus.mrc"), "--mesh",
          str(tmp_path / "mesh" / "mesh.pkl"), "--train-box", "16", "--epochs", "1", "--batch-size", "60",
          "--layers", "2", "--hidden", "16", "--out", str(tmp_path / "train"), "--device", "cpu", "--threads", "1"])
    lat = read_latents(tmp_path / "train" / "latents.csv")
    d = Dataset.load(tmp_path / "train" / "latents.cs")
    np.testing.assert_array_equal(d["uid"], load_cs(cs_path)["uid"][lat.ids - 1])
    for k in range(lat.k):
        np.testing.assert_allclose(d[f"components_mode_{k}/value"], lat.z[:, k], rtol=1e-6)
