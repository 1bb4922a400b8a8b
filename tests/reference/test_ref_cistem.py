"""Our CTF and projector against values computed by cisTEM.

The references are frozen in the cryojax 0.6.0 sdist (tests/data/cistem_ctf.npz, cistem_projection.npz),
made by its tests/generate_cistem_references.py with pycistem 0.4.1; `make test-setup` caches them.
What the files hold (read from that generator and from cryojax's tests/test_agree_with_cistem.py):

cistem_ctf.npz
    ``parameters`` (9, 7): defocus1, defocus2 (Å), astigmatism angle (deg), kV, Cs (mm), amplitude
    contrast, pixel size (Å).  ``ctf`` (9, 128, 65): cisTEM's ``CTF.Evaluate(k²·px², azimuth)`` on the
    unshifted rfft grid of a 128 box (row iy ↔ ky = fftfreq(128)[iy], column ix ↔ kx = ix/128, per pixel).
    Two things to know before comparing:
    * sign: cisTEM's CTF is the negative of RELION's (the files hold −A at k = 0; RELION has +A);
    * azimuth: the generator passes azimuth = arctan2(kx, ky) (cryojax's ``cartesian_to_polar`` puts x
      first), while cisTEM measures azimuths and its astigmatism angle from the x axis (its ApplyCTF
      uses atan2f(y, x)). So the value stored at (ky, kx) is cisTEM's CTF at the frequency mirrored
      across the diagonal, (ky', kx') = (kx, ky). We sample our CTF at that mirrored frequency; no
      assumption about the form of the astigmatism term is needed.
    cisTEM (like cryojax) uses λ = 12.2639/√(V + 0.97845e-6 V²) Å; torch-ctf/RELION use a constant
    ~3e-5 larger. At 0.75 Å/px and 1.2 µm defocus that is ~0.02 rad of phase at the corner of the
    spectrum, which sets the tolerance (measured max |Δ| ≈ 0.018; a wrong convention gives ~2).

cistem_projection.npz
    ``volume`` (64, 64, 64) float32, indexed [z, y, x] (written to MRC and read by cisTEM as such),
    ``angles`` (12, 3) cisTEM (φ, θ, ψ) in degrees, ``projections`` (12, 64, 64) [y, x] from cisTEM's
    ExtractSlice on the sinc²-deconvolved volume with the DC term zeroed, scaled so that
    projection = (∫V dz − mean) / N for N = 64 (cryojax divides its slice by the pixel size, zeroes
    DC and divides by N). cisTEM's Euler matrix, written out in cryojax's test_euler_matrix_with_cistem,
    is exactly RELION's Euler_angles2matrix, so the angles go into our RELION-convention projector
    unchanged (cryojax negates them only because its own pose type rotates the other way).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flexplugin.engine.ctf import CTFParams, compute_ctf
from flexplugin.engine.geometry import euler_to_matrix, euler_to_matrix_np
from flexplugin.engine.projector import project

from ..helpers import refdata


@pytest.fixture(scope="module")
def ctf_ref():
    return np.load(refdata.sdist_file(refdata.CRYOJAX, "tests/data/cistem_ctf.npz"))


@pytest.fixture(scope="module")
def proj_ref():
    return np.load(refdata.sdist_file(refdata.CRYOJAX, "tests/data/cistem_projection.npz"))


# ----------------------------------------------------------------------------------------------- CTF

def _our_ctf(params, n: int, angle: float | None = None) -> np.ndarray:
    """Our CTF (n, n//2+1) on the centred rfft grid for one cisTEM parameter row (optionally another angle)."""
    d1, d2, ast, kv, cs, ac, px = (float(x) for x in params)
    t = lambda x: torch.tensor([x], dtype=torch.float32)  # noqa: E731
    p = CTFParams(t(d1), t(d2), t(ast if angle is None else angle), t(kv), t(cs), t(ac), t(0.0), t(0.0))
    return compute_ctf(p, n, px)[0].double().numpy()


def _sample_mirrored(ours: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Our CTF at the frequency each reference pixel was evaluated at, and a validity mask.

    Reference pixel (iy, ix) ↔ (ky, kx) = (fftfreq(n)[iy], ix/n) holds cisTEM's CTF at (ky', kx') = (kx, ky).
    Our grid is centred: row r ↔ ky = (r - n//2)/n, column c ↔ kx = c/n ≥ 0. Friedel symmetry (the CTF
    is real and even) brings kx' < 0 to the stored half. Points needing ky' = +1/2 (absent from a
    centred grid) are masked out.
    """
    iy = np.round(np.fft.fftfreq(n) * n).astype(int)[:, None]  # ky·n
    ix = np.arange(n // 2 + 1)[None, :]  # kx·n
    ky_m, kx_m = np.broadcast_to(ix, (n, n // 2 + 1)), np.broadcast_to(iy, (n, n // 2 + 1))
    flip = kx_m < 0
    ky_m, kx_m = np.where(flip, -ky_m, ky_m), np.where(flip, -kx_m, kx_m)
    row = ky_m + n // 2
    valid = (row >= 0) & (row < n) & (kx_m <= n // 2)
    out = ours[np.clip(row, 0, n - 1), np.clip(kx_m, 0, n // 2)]
    return out, valid


def _ctf_errors(ref: np.ndarray, ours_sampled: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    d = (ours_sampled + ref)[valid]  # ours = −cisTEM
    return float(np.abs(d).max()), float(np.sqrt(np.mean(d ** 2)))


@pytest.mark.parametrize("index", range(9))
def test_ctf_matches_cistem(ctf_ref, index):
    params, ref = ctf_ref["parameters"][index], ctf_ref["ctf"][index].astype(np.float64)
    n = int(ctf_ref["grid_size"])
    d1, d2, ast, kv, cs, ac, px = params
    # k = 0: cisTEM gives −A, RELION (and we) +A
    assert ref[0, 0] == pytest.approx(-ac, abs=1e-6)
    ours, valid = _sample_mirrored(_our_ctf(params, n), n)
    assert valid.sum() > 0.99 * valid.size
    assert ours[0, 0] == pytest.approx(ac, abs=1e-6)
    max_err, rms_err = _ctf_errors(ref, ours, valid)
    assert max_err < 0.04 and rms_err < 5e-3, (max_err, rms_err)

    # the same comparison with deliberately wrong conventions must be far worse
    assert _ctf_errors(-ref, ours, valid)[1] > 0.3  # RELION vs cisTEM sign ignored
    if abs(d1 - d2) > 100:  # astigmatic sets
        # angle taken from the y axis, which is the same as defocus U and V swapped
        w_max, w_rms = _ctf_errors(ref, _sample_mirrored(_our_ctf(params, n, angle=ast + 90.0), n)[0], valid)
        assert w_max > 1.0 and w_rms > 20 * rms_err, (w_max, w_rms, rms_err)
        if abs(np.sin(2 * np.deg2rad(ast))) > 0.1:  # a clockwise angle is distinguishable
            w_max, w_rms = _ctf_errors(ref, _sample_mirrored(_our_ctf(params, n, angle=-ast), n)[0], valid)
            assert w_max > 1.0 and w_rms > 20 * rms_err, (w_max, w_rms, rms_err)
        if abs(np.cos(2 * np.deg2rad(ast))) > 0.1:
            # reading the reference without the mirror (i.e. trusting an angle taken from y) disagrees too
            naive = np.fft.ifftshift(_our_ctf(params, n), axes=0)
            assert np.sqrt(np.mean((naive + ref) ** 2)) > 20 * rms_err


# ------------------------------------------------------------------------------------------ rotations

@pytest.mark.parametrize("phi, theta, psi", [(10.0, 90.0, 170.0), (10.0, 80.0, -20.0), (-1.2, 90.5, 67.0),
                                             (-50.0, 62.0, -21.0)])
def test_euler_matrix_is_cistems(phi, theta, psi):
    """cisTEM's ZYZ matrix (as written out in cryojax's test) is our RELION matrix, no sign changes."""
    f, t, p = np.deg2rad([phi, theta, psi])
    cf, sf, ct, st, cp, sp = np.cos(f), np.sin(f), np.cos(t), np.sin(t), np.cos(p), np.sin(p)
    cistem = np.array([[cf * ct * cp - sf * sp, sf * ct * cp + cf * sp, -st * cp],
                       [-cf * ct * sp - sf * cp, -sf * ct * sp + cf * cp, st * sp],
                       [st * cf, st * sf, ct]])
    np.testing.assert_allclose(euler_to_matrix_np(phi, theta, psi), cistem, atol=1e-12)


# ------------------------------------------------------------------------------------------ projection

def _project_normalised(vol: torch.Tensor, A: torch.Tensor) -> np.ndarray:
    n = vol.shape[-1]
    p = project(vol, A.to(torch.float32)).double().numpy()
    return (p - p.mean(axis=(1, 2), keepdims=True)) / n


def _agreement(ours: np.ndarray, ref: np.ndarray):
    cc = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, ref)])
    rel = np.linalg.norm(ours - ref, axis=(1, 2)) / np.linalg.norm(ref, axis=(1, 2))
    scale = np.array([(a * b).sum() / (a * a).sum() for a, b in zip(ours, ref)])
    return cc, rel, scale


def test_projection_matches_cistem(proj_ref):
    vol = torch.from_numpy(np.ascontiguousarray(proj_ref["volume"], dtype=np.float32))
    ang = torch.from_numpy(proj_ref["angles"])
    ref = proj_ref["projections"].astype(np.float64)
    assert int(proj_ref["box_size"]) == vol.shape[-1] == 64 and float(proj_ref["voxel_size"]) == 1.0
    A = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])

    cc, rel, scale = _agreement(_project_normalised(vol, A), ref)
    # measured: cc ≥ 0.9995, rel ≤ 0.034, scale 0.993..1.017 (cisTEM: trilinear on the deconvolved
    # volume without padding; we pad 2x; grid-aligned poses differ most)
    assert cc.min() > 0.999, cc
    assert rel.max() < 0.06, rel
    assert np.abs(scale - 1).max() < 0.03, scale

    # wrong conventions: inverse rotation, negated angles, x/y swapped in the image, mirrored hand
    flip_z = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=A.dtype))
    wrong = {
        "transposed matrix": _project_normalised(vol, A.transpose(-1, -2)),
        "negated angles": _project_normalised(vol, euler_to_matrix(-ang[:, 0], -ang[:, 1], -ang[:, 2])),
        "image transposed": _project_normalised(vol, A).transpose(0, 2, 1),
        "other hand": _project_normalised(vol, A @ flip_z),
    }
    for name, imgs in wrong.items():
        w_cc, w_rel, _ = _agreement(imgs, ref)
        # measured: min cc 0.63..0.73, max rel 0.71..0.85
        assert w_cc.min() < 0.9 and w_rel.max() > 0.4, (name, w_cc.min(), w_rel.max())
        assert np.median(w_rel) > 5 * np.median(rel), name
