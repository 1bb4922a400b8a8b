"""Our STAR/MRC reader and projector on real files from the cryodrgn 4.3.1 sdist (tests/data).

The files are RELION's own output (3.0, 3.1 with the optics block first or last, six optics groups,
RELION 5), seven real EMPIAR-10076 particles, and cryoDRGN's chiral "hand" volume with projections it
made at known poses. Every value our reader returns is checked against the file parsed here by hand
(a few lines of code below, sharing nothing with `starfile`), and every image against mrcfile.
Files that lack something we need must be either handled or refused with a clear InputError; each
case asserts which.
"""
from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from flexplugin.engine.errors import InputError
from flexplugin.engine.geometry import euler_to_matrix_np
from flexplugin.engine.io import read_particles
from flexplugin.engine.projector import project
from flexplugin.engine.reconstruct import reconstruct_particles

from ..helpers import refdata

pytestmark = pytest.mark.filterwarnings("ignore:.*(Map ID string|machine stamp).*:RuntimeWarning")


def _data(name: str) -> Path:
    return refdata.sdist_file(refdata.CRYODRGN, f"tests/data/{name}")


# --------------------------------------------------------------------------------- independent parser

def _parse_star(path: Path) -> dict[str, list[dict[str, str]]]:
    """Loop blocks of a STAR file: {block name: rows as {label without '_': raw string}}."""
    blocks: dict[str, list[dict[str, str]]] = {}
    name, labels, rows, in_loop = None, [], None, False
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            name, labels, in_loop = line[5:], [], False
            rows = blocks.setdefault(name, [])
        elif line == "loop_":
            labels, in_loop = [], True
        elif line.startswith("_") and in_loop:
            labels.append(line.split()[0][1:])
        elif in_loop and labels:
            vals = line.split()
            assert len(vals) == len(labels), (path, line)
            rows.append(dict(zip(labels, vals)))
    return blocks


def _col(rows, label, dtype=float) -> np.ndarray:
    return np.array([dtype(r[label]) for r in rows])


def _split(name: str) -> tuple[int, str]:
    i, p = name.split("@", 1)
    return int(i), p


def _check_against_parse(P, rows, apix: float, optics_of_row: list[dict[str, str]] | None = None):
    """Angles, origins (Å and px), CTF, ids, half sets: our ParticleSet vs the hand-parsed rows."""
    n = len(rows)
    assert len(P) == n
    assert P.apix == pytest.approx(apix, rel=1e-9)
    np.testing.assert_array_equal(P.ids, np.arange(1, n + 1))  # no rlnImageId in these files: row numbers
    rot, tilt, psi = (_col(rows, f"rlnAngle{a}") for a in ("Rot", "Tilt", "Psi"))
    A = euler_to_matrix_np(rot, tilt, psi)
    np.testing.assert_allclose(P.rotations(np.arange(n)).numpy(), A, atol=1e-6)
    if "rlnOriginXAngst" in rows[0]:
        ox, oy = _col(rows, "rlnOriginXAngst"), _col(rows, "rlnOriginYAngst")
    elif "rlnOriginX" in rows[0]:  # RELION 3.0: pixels
        ox, oy = _col(rows, "rlnOriginX") * apix, _col(rows, "rlnOriginY") * apix
    else:
        ox = oy = np.zeros(n)
    np.testing.assert_allclose(P.table["rlnOriginXAngst"], ox, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(P.table["rlnOriginYAngst"], oy, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(P.shifts_px(np.arange(n)).numpy(), np.stack([ox, oy], 1) / apix, atol=1e-5)
    _check_ctf(P, rows, optics_of_row)
    subset = _col(rows, "rlnRandomSubset", int) if "rlnRandomSubset" in rows[0] else None
    if subset is not None and set(subset) == {1, 2}:
        np.testing.assert_array_equal(P.half_sets(), subset)
    else:  # absent or one-sided (relion31.star has all 1s): a seeded random split into two halves
        h = P.half_sets()
        assert set(h) == {1, 2} and abs(int((h == 1).sum()) - int((h == 2).sum())) <= 1


def _check_ctf(P, rows, optics_of_row=None):
    n = len(rows)
    c = P.ctf_params(np.arange(n))
    src = [{**(optics_of_row[i] if optics_of_row else {}), **rows[i]} for i in range(n)]
    for field, label in [("defocus_u", "rlnDefocusU"), ("defocus_v", "rlnDefocusV"),
                         ("defocus_angle", "rlnDefocusAngle"), ("voltage", "rlnVoltage"),
                         ("cs", "rlnSphericalAberration"), ("amplitude_contrast", "rlnAmplitudeContrast")]:
        if label not in src[0]:
            continue  # the reader's documented default applies; asserted by the caller
        np.testing.assert_allclose(getattr(c, field).numpy(), _col(src, label), rtol=1e-6, err_msg=label)
    if "rlnPhaseShift" in src[0]:
        np.testing.assert_allclose(c.phase_shift.numpy(), _col(src, "rlnPhaseShift"), atol=1e-6)


def _check_images(P, rows, star_dir: Path):
    imgs = P.images(np.arange(len(rows)))
    assert imgs.shape == (len(rows), P.box, P.box) and imgs.dtype == np.float32
    assert np.isfinite(imgs).all() and imgs.std() > 0
    for j, r in enumerate(rows):
        i, path = _split(r["rlnImageName"])
        with mrcfile.mmap(star_dir / path, mode="r", permissive=True) as m:
            stack = m.data if m.data.ndim == 3 else m.data[None]
            np.testing.assert_array_equal(imgs[j], np.asarray(stack[i - 1], dtype=np.float32))


# ------------------------------------------------------------------------------------------ RELION 3.1

@pytest.mark.parametrize("name", ["relion31.star", "relion31.v2.star"])  # optics block first / last
def test_relion31(name):
    path = _data(name)
    blocks = _parse_star(path)
    (optics,), rows = blocks["optics"], blocks["particles"]
    P = read_particles(path)
    assert P.box == int(optics["rlnImageSize"]) == 256
    _check_against_parse(P, rows, float(optics["rlnImagePixelSize"]), [optics] * len(rows))
    assert P.apix == 2.806 and not P.phase_flipped
    _check_images(P, rows, path.parent)


def test_relion31_six_optics_groups_with_different_pixel_sizes_is_refused():
    path = _data("relion31.6opticsgroups.star")
    blocks = _parse_star(path)
    assert len(blocks["optics"]) == 6
    assert {float(o["rlnImagePixelSize"]) for o in blocks["optics"]} == {1.24, 1.25}
    groups = set(_col(blocks["particles"], "rlnOpticsGroup", int))
    assert groups == {1, 2, 3, 4, 5, 6}  # the particles really use groups of both pixel sizes
    # the reader does not silently pick one pixel size: it refuses, before touching the (absent) stacks
    with pytest.raises(InputError, match="different pixel sizes"):
        read_particles(path)


# -------------------------------------------------------------------------------------------- RELION 5

def _relion5_copy(tmp_path: Path) -> tuple[Path, list[dict[str, str]]]:
    star = tmp_path / "relion5.star"
    shutil.copy(_data("relion5.star"), star)
    return star, _parse_star(star)["particles"]


def test_relion5_with_its_stacks_replaced_by_marked_448px_stacks(tmp_path):
    """RELION 5 metadata (optics with aberrations and mag. matrix) read right; stack/index → right image."""
    star, rows = _relion5_copy(tmp_path)
    (optics,) = _parse_star(star)["optics"]
    assert int(optics["rlnImageSize"]) == 448
    n_img = {p: max(_split(r["rlnImageName"])[0] for r in rows if _split(r["rlnImageName"])[1] == p)
             for p in ("toy_images_a.mrcs", "toy_images_b.mrcs")}
    base = {"toy_images_a.mrcs": 0, "toy_images_b.mrcs": 50}
    for p, k in n_img.items():  # image i of stack p is filled with base[p] + i (int8 keeps it small)
        data = (base[p] + np.arange(1, k + 1, dtype=np.int8))[:, None, None] * np.ones((1, 448, 448), np.int8)
        with mrcfile.new(tmp_path / p) as m:
            m.set_data(data)
            m.set_image_stack()
    P = read_particles(star)
    assert P.box == 448 and len(P) == len(rows) == 17
    _check_against_parse(P, rows, float(optics["rlnImagePixelSize"]), [optics] * len(rows))
    assert P.apix == 0.89
    imgs = P.images(np.arange(len(P)))
    want = [base[_split(r["rlnImageName"])[1]] + _split(r["rlnImageName"])[0] for r in rows]
    np.testing.assert_array_equal(imgs[:, 0, 0], want)
    np.testing.assert_array_equal(imgs.reshape(len(rows), -1).min(1), imgs.reshape(len(rows), -1).max(1))
    P.check_stacks()


def test_relion5_with_cryodrgns_30px_stacks_is_refused(tmp_path):
    """cryoDRGN ships 30-px stacks for this file, which says rlnImageSize 448: refuse clearly."""
    star, _ = _relion5_copy(tmp_path)
    for p in ("toy_images_a.mrcs", "toy_images_b.mrcs"):
        shutil.copy(_data(f"toy_datadir/{p}"), tmp_path / p)
    with pytest.raises(InputError, match=r"rlnImageSize is 448 .* 30-px"):
        read_particles(star)


def test_relion5_in_place_without_stacks_is_refused():
    with pytest.raises(InputError, match="image stack not found"):
        read_particles(_data("relion5.star"))


# ------------------------------------------------------------------------------ RELION 3.0 (no optics)

def test_empiar_10076_relion30_without_optics_poses_or_image_size():
    """7 real particles; pixel size from detector pixel / magnification, box from the stack; no poses."""
    path = _data("empiar_10076_7.star")
    rows = _parse_star(path)[""]
    P = read_particles(path)
    apix = float(rows[0]["rlnDetectorPixelSize"]) * 1e4 / float(rows[0]["rlnMagnification"])
    assert P.apix == pytest.approx(apix, rel=1e-12) and P.apix == pytest.approx(1.31, abs=1e-3)
    with mrcfile.mmap(_data("empiar_10076_7.mrc"), mode="r", permissive=True) as m:
        assert P.box == m.data.shape[-1] == 320  # no rlnImageSize: taken from the stack
    assert len(P) == 7 and P.has_ctf and not P.has_poses
    _check_ctf(P, rows)
    np.testing.assert_array_equal(P.ids, np.arange(1, 8))
    _check_images(P, rows, path.parent)
    with pytest.raises(InputError, match="alignment"):
        P.require(poses=True, ctf=True)


def test_relion30_origins_in_pixels_are_converted_to_angstrom(tmp_path):
    """RELION 3.0.6 refinement output (rlnOriginX/Y in pixels); its stack is replaced by a dummy."""
    star = tmp_path / "FinalRefinement-OriginalParticles-PfCRT.star"
    shutil.copy(_data(star.name), star)
    rows = _parse_star(star)["images"]
    stack = tmp_path / _split(rows[0]["rlnImageName"])[1]
    stack.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with mrcfile.new(stack) as m:
        m.set_data(rng.normal(size=(len(rows), 32, 32)).astype(np.float32))
        m.set_image_stack()
    P = read_particles(star)
    apix = float(rows[0]["rlnDetectorPixelSize"]) * 1e4 / float(rows[0]["rlnMagnification"])
    assert P.apix == pytest.approx(1.035, rel=1e-12) == apix
    assert P.box == 32
    _check_against_parse(P, rows, apix)
    np.testing.assert_allclose(P.shifts_px(np.arange(len(rows))).numpy()[:, 0], _col(rows, "rlnOriginX"),
                               atol=1e-5)
    # the file has no rlnAmplitudeContrast: the reader copes with its documented default (0.1), where
    # RELION 3.0's CTF::read would have used 0
    assert "rlnAmplitudeContrast" not in rows[0]
    np.testing.assert_allclose(P.ctf_params(np.arange(len(rows))).amplitude_contrast.numpy(), 0.1)
    _check_images(P, rows, star.parent)


def test_relion30_subtomogram_stack_with_poses():
    path = _data("sta_testing_bin8.star")
    rows = _parse_star(path)[""]
    P = read_particles(path)
    assert len(P) == 219 and P.box == 64
    _check_against_parse(P, rows, 1.96)
    rows_sub = rows[:40]
    P.images(np.arange(40))
    _check_images(P.subset(np.arange(40)), rows_sub, path.parent)


# --------------------------------------------------------------------------- bad input on real files

def _relion31_variant(tmp_path: Path, edit) -> Path:
    """relion31.star with its stack linked next to it and `edit(text) -> text` applied."""
    (tmp_path / "relion31.mrcs").symlink_to(_data("relion31.mrcs"))
    star = tmp_path / "relion31.star"
    star.write_text(edit(_data("relion31.star").read_text()))
    return star


def _drop_columns(text: str, labels: tuple[str, ...]) -> str:
    """Remove whole columns from the data_particles loop (labels and values), keeping the rest intact."""
    head, body = text.split("data_particles", 1)
    lines = body.splitlines()
    lab = [ln.split()[0][1:] for ln in lines if ln.startswith("_")]
    drop = {i for i, name in enumerate(lab) if name in labels}
    out, k = [], 0
    for ln in lines:
        if ln.startswith("_"):
            if k not in drop:
                out.append(ln)
            k += 1
        elif ln.strip() and len(ln.split()) == len(lab):
            out.append(" ".join(v for i, v in enumerate(ln.split()) if i not in drop))
        else:
            out.append(ln)
    return head + "data_particles" + "\n".join(out) + "\n"


def test_missing_poses_give_input_error_about_alignment(tmp_path):
    star = _relion31_variant(tmp_path, lambda t: _drop_columns(t, ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    P = read_particles(star)
    assert len(P) == 5 and not P.has_poses and P.has_ctf
    with pytest.raises(InputError, match="alignment"):
        P.require(poses=True, ctf=False)
    with pytest.raises(InputError, match="alignment"):
        reconstruct_particles(P)


def test_missing_stack_gives_input_error(tmp_path):
    star = _relion31_variant(tmp_path, lambda t: t.replace("@relion31.mrcs", "@missing.mrcs"))
    with pytest.raises(InputError, match="not found"):
        read_particles(star)


def test_one_missing_stack_among_several_gives_input_error(tmp_path):
    star = _relion31_variant(tmp_path, lambda t: t.replace("000003@relion31.mrcs", "000003@missing.mrcs"))
    P = read_particles(star)
    P.images([0, 1])
    with pytest.raises(InputError, match="not found"):
        P.images([2])
    with pytest.raises(InputError, match="not found"):
        P.check_stacks()


def test_index_beyond_stack_end_gives_input_error(tmp_path):
    star = _relion31_variant(tmp_path, lambda t: t.replace("000005@relion31.mrcs", "000009@relion31.mrcs"))
    P = read_particles(star)
    P.images([0, 1, 2, 3])
    with pytest.raises(InputError, match="beyond the end"):
        P.images([4])
    with pytest.raises(InputError, match="5 images"):
        P.check_stacks()


# ------------------------------------------------------------------- cryoDRGN's chiral "hand" volume

def _cryodrgn_function(name: str):
    """A pure-numpy function from the cached cryodrgn sdist's utils.py (its module imports are heavy)."""
    src = refdata.sdist_file(refdata.CRYODRGN, "cryodrgn/utils.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"np": np}
    exec(compile(ast.Module([fn], []), "cryodrgn/utils.py", "exec"), ns)  # noqa: S102
    return ns[name]


def test_cryodrgn_relion_matrices_are_ours():
    R_from_relion = _cryodrgn_function("R_from_relion")
    rng = np.random.default_rng(1)
    e = np.concatenate([rng.uniform(-180, 180, (50, 3)), [[0, 0, 0], [30, 180, -20], [90, 90, 90]]])
    e[:50, 1] = np.rad2deg(np.arccos(rng.uniform(-1, 1, 50)))
    np.testing.assert_allclose(R_from_relion(e), euler_to_matrix_np(e[:, 0], e[:, 1], e[:, 2]), atol=1e-12)


def test_projection_of_hand_matches_cryodrgn():
    """cryoDRGN's projections of its chiral test volume at its poses (RELION matrices, see above)."""
    vol = torch.from_numpy(np.array(mrcfile.read(_data("hand-vol.mrc")), dtype=np.float32))
    imgs = np.array(mrcfile.read(_data("hand.mrcs")), dtype=np.float64)
    with open(_data("hand_rot.pkl"), "rb") as f:
        R = np.asarray(pickle.load(f), dtype=np.float64)
    k = 12
    R, imgs = torch.from_numpy(R[:k]), imgs[:k]
    assert np.allclose(np.linalg.det(R.numpy()), 1, atol=1e-5)

    def ccs(A, volume=vol, transpose=False):
        p = project(volume, A.to(torch.float32)).double().numpy()
        if transpose:
            p = p.transpose(0, 2, 1)
        return np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(p, imgs)])

    cc = ccs(R)
    assert cc.min() > 0.99, cc  # measured ≥ 0.998
    # the mirror-image hand, the inverse rotation and an x/y swap are all far off
    for wrong in (ccs(R, volume=vol.flip(0)), ccs(R.transpose(-1, -2)), ccs(R, transpose=True)):
        assert wrong.min() < 0.5 and np.median(wrong) < 0.9, wrong
