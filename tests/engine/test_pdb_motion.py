"""Benchmark data from real structures: PDB reading, superposition, ANM facts, motions, and the written data set.

The structures come from the published mdanalysistests 2.11.0 sdist in the reference cache (`make test-setup`):
missing, these tests skip locally and fail under CI=true.
"""
import json

import numpy as np
import pandas as pd
import pytest

from flexplugin.engine.errors import InputError
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.pdb_motion import (
    ADK_CORE,
    BENCHMARKS,
    anm_hessian,
    anm_modes,
    kabsch,
    make_benchmark,
    normal_mode,
    read_pdb,
    two_state,
)
from flexplugin.engine.simulate import moving_atoms, moving_mask

from ..helpers.refdata import MDATESTS, sdist_file

DATA = "MDAnalysisTests/data/"
LID_NMP = ((30, 59), (122, 159))


@pytest.fixture(scope="module")
def adk():
    """AdK closed and open (heavy atoms) and their two-state motion."""
    a, b = (read_pdb(sdist_file(MDATESTS, DATA + f)) for f in ("adk_closed.pdb", "adk_open.pdb"))
    return a, b, two_state(a, b, ADK_CORE)


@pytest.fixture(scope="module")
def hivpr():
    return read_pdb(sdist_file(MDATESTS, DATA + "1hvr.pdb"))


def test_read_pdb_heavy_atoms(adk, hivpr):
    a, b, _ = adk
    path = sdist_file(MDATESTS, DATA + "adk_open.pdb")
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("ATOM")]
    heavy = [ln for ln in lines if not ln[12:16].strip().startswith("H")]  # CHARMM file: no element column
    assert len(lines) == 3341 and len(b) == len(heavy) == 1656
    assert set(b.element) == {"C", "N", "O", "S"} and not any(n.startswith("H") for n in b.atom_name)
    assert b.ca_mask().sum() == 214 and b.res_seq.min() == 1 and b.res_seq.max() == 214
    assert a.keys() == b.keys()
    # 1HVR: two chains of 99 residues, the inhibitor (XK2) dropped, S-hydroxycysteine 67 (MODRES) kept
    assert set(hivpr.chain) == {"A", "B"} and hivpr.ca_mask().sum() == 198
    assert "XK2" not in set(hivpr.res_name) and "HOH" not in set(hivpr.res_name)
    assert ((hivpr.res_name == "CSO") & hivpr.ca_mask()).sum() == 2


def test_read_pdb_records_and_errors(tmp_path):
    def atom(rec, serial, name, alt, res, seq, x, el):
        return (f"{rec:<6}{serial:>5} {name:<4}{alt}{res:>3} A{seq:>4}    {x:8.3f}{0:8.3f}{0:8.3f}"
                f"  1.00  0.00          {el:>2}")
    pdb = tmp_path / "m.pdb"
    pdb.write_text("\n".join([
        "MODEL        1",
        atom("ATOM", 1, "N", " ", "GLY", 1, 0.0, "N"), atom("ATOM", 2, "CA", "A", "GLY", 1, 1.0, "C"),
        atom("ATOM", 3, "CA", "B", "GLY", 1, 9.0, "C"), atom("ATOM", 4, "H", " ", "GLY", 1, 2.0, "H"),
        atom("HETATM", 5, "O", " ", "HOH", 2, 3.0, "O"), "ENDMDL", "MODEL        2",
        atom("ATOM", 1, "N", " ", "GLY", 1, 50.0, "N"), "ENDMDL", "END", ""]))
    s = read_pdb(pdb)
    assert s.atom_name.tolist() == ["N", "CA"] and s.coords[:, 0].tolist() == [0.0, 1.0]
    with pytest.raises(InputError, match="not found"):
        read_pdb(tmp_path / "missing.pdb")
    (tmp_path / "empty.pdb").write_text("")
    with pytest.raises(InputError, match="no protein heavy atoms"):
        read_pdb(tmp_path / "empty.pdb")


def test_kabsch_recovers_a_rigid_motion():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)) * 10
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))  # a proper rotation
    y = x @ q.T + np.array([3.0, -2, 7])
    R, s = kabsch(x, y)
    np.testing.assert_allclose(x @ R.T + s, y, atol=1e-10)
    assert np.linalg.det(R) == pytest.approx(1.0)


def test_adk_superposed_on_core_lid_and_nmp_close(adk):
    a, b, m = adk
    ca, core = a.ca_mask(), a.residue_mask(ADK_CORE)
    d = np.linalg.norm(m.end - m.start, axis=1)
    assert np.sqrt((d[ca & core] ** 2).mean()) < 2.5  # Å, the CORE barely changes after the fit
    assert d[ca & a.residue_mask(((122, 159),))].mean() > 10 and d.max() > 20  # the LID swings by many Å
    assert d[ca & a.residue_mask(((30, 59),))].mean() > 7
    # the ends are the two structures exactly: t = -1 is `a` translated, t = +1 is `b` moved rigidly
    ends = m.atoms(np.array([-1.0, 1.0]))
    np.testing.assert_array_equal(ends[0], m.start)
    np.testing.assert_array_equal(ends[1], m.end)
    shift = ends[0] - a.coords
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-12)
    R, s = kabsch(b.coords, ends[1])
    np.testing.assert_allclose(b.coords @ R.T + s, ends[1], atol=1e-9)
    # centred on the mean structure's centroid; the midpoint is halfway
    np.testing.assert_allclose(((ends[0] + ends[1]) / 2).mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(m.atoms(np.array([0.0]))[0], (m.start + m.end) / 2, atol=1e-12)
    assert m.atoms(np.zeros(5)).shape == (5, m.n_atoms, 3)


def test_anm_analytic_facts(adk):
    ca = adk[0].coords[adk[0].ca_mask()]
    H = anm_hessian(ca)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    vals = np.linalg.eigvalsh(H)
    assert (np.abs(vals) < 1e-8 * vals[-1]).sum() == 6 and vals[6] > 1e-3  # connected: only the rigid modes
    # a rigid translation and an infinitesimal rotation cost no elastic energy
    c = ca - ca.mean(0)
    for v in (np.tile([1.0, 2, 3], (len(ca), 1)), np.cross([0.3, -1, 0.5], c)):
        assert v.ravel() @ H @ v.ravel() < 1e-9 * (v ** 2).sum() * vals[-1]
    ev, modes = anm_modes(ca, n_modes=10)
    flat = modes.reshape(10, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-10)
    np.testing.assert_allclose(ev, vals[6:16], rtol=1e-8)
    np.testing.assert_allclose((flat @ H) * flat, ev[:, None] * flat * flat, atol=1e-8)  # H v = λ v
    # two far apart pieces are not one network: refused
    with pytest.raises(InputError, match="falls apart"):
        anm_modes(np.r_[c, c + 500.0])


def test_normal_mode_amplitude_and_symmetry(hivpr):
    m = normal_mode(hivpr, mode=1, amplitude_A=8.0)
    x0 = m.atoms(np.array([0.0]))[0]
    np.testing.assert_allclose(x0, hivpr.coords - hivpr.coords.mean(0), atol=1e-12)
    for t in (-1.0, 1.0):
        assert np.linalg.norm(m.atoms(np.array([t]))[0] - x0, axis=1).max() == pytest.approx(8.0)
    # every atom of a residue moves with its Cα
    move = m.end - m.start
    res = (hivpr.chain == "A") & (hivpr.res_seq == 50)
    np.testing.assert_allclose(move[res], np.broadcast_to(move[res][0], move[res].shape), atol=1e-12)

    # why mode 1: the dimer's C2 maps mode 0's t = +1 onto its t = -1 (the sign of t would be lost), not mode 1's
    A = np.flatnonzero(hivpr.ca_mask() & (hivpr.chain == "A"))
    B = np.flatnonzero(hivpr.ca_mask() & (hivpr.chain == "B"))

    def swapped_rmsd(mm):
        p, q = mm.end[np.r_[A, B]], mm.start[np.r_[B, A]]
        R, s = kabsch(p, q)
        return np.sqrt(((p @ R.T + s - q) ** 2).sum(1).mean())
    assert swapped_rmsd(normal_mode(hivpr, 0, 8.0)) < 0.6 and swapped_rmsd(m) > 4.0
    assert BENCHMARKS["hivpr-mode"].params == {"mode": 1, "amplitude_A": 8.0}


def test_moving_mask_covers_the_moving_domains(adk):
    a, _, m = adk
    ca, lid_nmp, core = a.ca_mask(), a.residue_mask(LID_NMP), a.residue_mask(ADK_CORE)
    sel = moving_atoms(m)
    assert sel[lid_nmp].mean() > 0.8 and sel[core].mean() < 0.05
    box, apix = 64, 1.5
    mm = moving_mask(m, np.linspace(-1, 1, 9), box, apix, 2.0)
    for t in (-1.0, 0.0, 1.0):
        i = np.rint(m.atoms(np.array([t]))[0] / apix).astype(int) + box // 2
        inside = mm[i[:, 2], i[:, 1], i[:, 0]] > 0.5
        assert inside[ca & lid_nmp].all() and inside[ca & core].mean() < 0.4


def test_make_benchmark_writes_a_dataset(tmp_path, adk):
    sdist = sdist_file(MDATESTS, DATA + "adk_open.pdb").parents[2]
    out = tmp_path / "adk"
    meta = make_benchmark("adk-closure", sdist, out, n=64, box=32, apix=3.5, snr=1.0, seed=2, stack_size=40,
                          progress=lambda s: None)
    for f in ("particles.star", "stacks/particles_000.mrcs", "stacks/particles_001.mrcs", "consensus.mrc",
              "mask.mrc", "gt/states.csv", "gt/state_000.mrc", "gt/state_008.mrc", "gt/moving_mask.mrc",
              "ground_truth.csv", "simulation.json"):
        assert (out / f).is_file(), f
    saved = json.loads((out / "simulation.json").read_text())
    assert saved["dataset"]["name"] == "adk-closure" == meta["dataset"]["name"]
    assert saved["dataset"]["description"] == BENCHMARKS["adk-closure"].description
    assert saved["n_atoms"] == 1656 and saved["dataset"]["max_displacement_A"] > 20
    ps = read_particles(out / "particles.star")
    assert len(ps.ids) == 64 and ps.images(slice(None)).shape == (64, 32, 32)
    gt = pd.read_csv(out / "ground_truth.csv")
    assert gt["rlnImageId"].tolist() == ps.ids.tolist() and gt["motion"].between(-1, 1).all()
    s0, s8 = (read_volume(out / f"gt/state_00{i}.mrc")[0] for i in (0, 8))
    mask, mm = read_volume(out / "mask.mrc")[0], read_volume(out / "gt/moving_mask.mrc")[0]
    assert np.corrcoef(s0.ravel(), s8.ravel())[0, 1] < 0.9  # closed and open differ at 3.5 Å/px
    assert 0 < (mm > 0.5).sum() < (mask > 0.5).sum() and (mm * (mask < 0.01)).sum() < 0.01 * mm.sum()
    # the density that differs between the end states lies in the moving mask
    diff = np.abs(s8 - s0)
    assert (diff * (mm > 0.5)).sum() > 0.8 * diff.sum()
    # a box too small for the open state is refused before any work
    with pytest.raises(InputError, match="larger box"):
        make_benchmark("adk-closure", sdist, tmp_path / "small", n=8, box=32, apix=2.0)
    with pytest.raises(InputError, match="unknown benchmark"):
        make_benchmark("nope", sdist, tmp_path / "x")
