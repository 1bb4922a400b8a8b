"""RELION Euler convention and Scipion ALIGN_PROJ matrices against independent references."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from flexplugin.engine.geometry import (
    euler_to_matrix,
    euler_to_matrix_np,
    matrix_to_euler_np,
    relion_from_scipion_matrix,
    scipion_matrix_from_relion,
)

RNG = np.random.default_rng(0)
ANGLES = np.concatenate([
    np.stack([RNG.uniform(-180, 180, 40), RNG.uniform(0, 180, 40), RNG.uniform(-180, 180, 40)], 1),
    np.array([[0, 0, 0], [30, 0, 40], [10, 180, -20], [0, 90, 0], [90, 90, 90], [-170, 5, 170]]),
])


def test_matches_scipy_zyz_passive():
    """A = Rz(psi)·Ry(tilt)·Rz(rot) passive = transpose of scipy's intrinsic active ZYZ rotation."""
    A = euler_to_matrix_np(ANGLES[:, 0], ANGLES[:, 1], ANGLES[:, 2])
    ref = Rotation.from_euler("ZYZ", ANGLES, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(A, ref, atol=1e-12)


def test_matches_pwem_transformations():
    """docs/algorithms.md §3: the rotation part of euler_matrix(-rot, -tilt, -psi, 'szyz') is RELION's A."""
    from pwem.convert.transformations import euler_matrix
    for rot, tilt, psi in ANGLES:
        ref = euler_matrix(np.deg2rad(-rot), np.deg2rad(-tilt), np.deg2rad(-psi), "szyz")[:3, :3]
        np.testing.assert_allclose(euler_to_matrix_np(rot, tilt, psi), ref, atol=1e-12)


def test_torch_batched_matches_numpy():
    a = torch.as_tensor(ANGLES)
    np.testing.assert_allclose(euler_to_matrix(a[:, 0], a[:, 1], a[:, 2]).numpy(),
                               euler_to_matrix_np(ANGLES[:, 0], ANGLES[:, 1], ANGLES[:, 2]), atol=1e-12)


def test_euler_round_trip_including_gimbal():
    A = euler_to_matrix_np(ANGLES[:, 0], ANGLES[:, 1], ANGLES[:, 2])
    rot, tilt, psi = matrix_to_euler_np(A)
    assert np.all((tilt >= -1e-9) & (tilt <= 180 + 1e-9))
    np.testing.assert_allclose(euler_to_matrix_np(rot, tilt, psi), A, atol=1e-9)
    # gimbal: tilt 0 puts the whole in-plane rotation into psi, like RELION
    r, t, p = matrix_to_euler_np(euler_to_matrix_np(30.0, 0.0, 40.0))
    assert (float(r), float(t)) == (0.0, 0.0) and float(p) == pytest.approx(70.0)


def test_scipion_matrix_convention_and_round_trip():
    """M = inv(Minv) with Minv = euler_matrix(-rot,-tilt,-psi,'szyz'), Minv[:3,3] = -s (pixels)."""
    from pwem.convert.transformations import euler_matrix
    for rot, tilt, psi in ANGLES[:12]:
        sx, sy = RNG.uniform(-5, 5, 2)
        Minv = euler_matrix(np.deg2rad(-rot), np.deg2rad(-tilt), np.deg2rad(-psi), "szyz")
        Minv[:3, 3] = [-sx, -sy, 0]
        M = scipion_matrix_from_relion(rot, tilt, psi, sx, sy)
        np.testing.assert_allclose(M, np.linalg.inv(Minv), atol=1e-10)
        r2, t2, p2, sx2, sy2 = relion_from_scipion_matrix(M)
        np.testing.assert_allclose(euler_to_matrix_np(r2, t2, p2), euler_to_matrix_np(rot, tilt, psi), atol=1e-9)
        assert (sx2, sy2) == pytest.approx((sx, sy), abs=1e-9)


def test_mirrored_matrix_rejected():
    M = np.diag([1.0, 1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="proper rotation"):
        relion_from_scipion_matrix(M)
