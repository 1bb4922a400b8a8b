"""Rotations and shifts in RELION's convention, and Scipion's ALIGN_PROJ 4x4 matrices.

RELION (Euler ZYZ, degrees): A = Rz(psi) Ry(tilt) Rz(rot) with "passive" elementary rotations,
exactly `Euler_angles2matrix` in RELION's `euler.cpp`. A projection at (rot, tilt, psi) is
    image(x, y) = ∫ V(Aᵀ (x, y, z)ᵀ) dz,
so the 3-D frequency sampled by the 2-D frequency k2 is Aᵀ (k2, 0): RELION's projector uses Ainv = Aᵀ.
The particle's origin s = (rlnOriginX, rlnOriginY) (pixels) is the shift that re-centres it: the
particle's content sits at −s, image(x) = proj(x + s). relion_project applies −origin to its projections
and relion_reconstruct +origin to the images before back-projection (checked against RELION 3.1 in
tests/test_ref_relion.py).

Scipion (ALIGN_PROJ, as the relion plugin's converter): M = [[Aᵀ, Aᵀ s], [0, 1]] with s = (sx, sy, 0)
in pixels; equivalently inv(M) = [[A, -s], [0, 1]].

numpy functions are used by the Scipion converter; torch twins are used by the engine (batched).
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "euler_to_matrix", "matrix_to_euler", "euler_to_matrix_np", "matrix_to_euler_np",
    "scipion_matrix_from_relion", "relion_from_scipion_matrix",
]


def euler_to_matrix(rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """RELION rotation matrices (..., 3, 3) from Euler angles in degrees (batched, differentiable)."""
    a, b, g = (torch.deg2rad(torch.as_tensor(t)) for t in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def euler_to_matrix_np(rot: float | np.ndarray, tilt: float | np.ndarray,
                       psi: float | np.ndarray) -> np.ndarray:
    """numpy float64 version of :func:`euler_to_matrix`."""
    r, t, p = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    return euler_to_matrix(r, t, p).numpy()


def matrix_to_euler_np(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION Euler angles (degrees) from rotation matrices (..., 3, 3); RELION's Euler_matrix2angles.

    Gimbal lock (|sin tilt| < 1e-6) is resolved as RELION does: rot = 0, psi carries the in-plane angle.
    """
    A = np.asarray(A, dtype=np.float64)
    abs_sb = np.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = abs_sb > 16 * np.finfo(np.float32).eps
    with np.errstate(invalid="ignore", divide="ignore"):
        gamma = np.where(regular, np.arctan2(A[..., 1, 2], -A[..., 0, 2]), 0.0)
        alpha = np.where(regular, np.arctan2(A[..., 2, 1], A[..., 2, 0]), 0.0)
        sign_sb = np.where(np.abs(np.sin(gamma)) < 1e-6,
                           np.sign(-A[..., 0, 2] / np.where(np.cos(gamma) == 0, 1, np.cos(gamma))),
                           np.where(np.sin(gamma) > 0, np.sign(A[..., 1, 2]), -np.sign(A[..., 1, 2])))
        beta = np.where(regular, np.arctan2(sign_sb * abs_sb, A[..., 2, 2]), 0.0)
        # gimbal lock: tilt is 0 or 180, the whole in-plane rotation goes into psi
        beta_g = np.where(A[..., 2, 2] > 0, 0.0, np.pi)
        gamma_g = np.where(A[..., 2, 2] > 0, np.arctan2(-A[..., 1, 0], A[..., 0, 0]),
                           np.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    beta = np.where(regular, beta, beta_g)
    gamma = np.where(regular, gamma, gamma_g)
    return np.rad2deg(alpha), np.rad2deg(beta), np.rad2deg(gamma)


def matrix_to_euler(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch wrapper of :func:`matrix_to_euler_np` (not differentiable)."""
    r, t, p = (torch.as_tensor(v, dtype=A.dtype, device=A.device)
               for v in matrix_to_euler_np(A.detach().cpu().double().numpy()))
    return r, t, p


def scipion_matrix_from_relion(rot: float, tilt: float, psi: float,
                               shift_x_px: float, shift_y_px: float) -> np.ndarray:
    """Scipion ALIGN_PROJ 4x4 matrix from RELION angles (deg) and origin shifts (pixels)."""
    A = euler_to_matrix_np(rot, tilt, psi)
    s = np.array([shift_x_px, shift_y_px, 0.0])
    M = np.eye(4)
    M[:3, :3] = A.T
    M[:3, 3] = A.T @ s
    return M


def relion_from_scipion_matrix(M: np.ndarray) -> tuple[float, float, float, float, float]:
    """(rot, tilt, psi, shift_x_px, shift_y_px) from a Scipion ALIGN_PROJ 4x4 matrix.

    Any z component of the shift (which RELION cannot represent) is dropped, as the relion plugin does.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.shape != (4, 4):
        raise ValueError(f"expected a 4x4 matrix, got shape {M.shape}")
    A = M[:3, :3].T
    det = np.linalg.det(A)
    if not math.isclose(det, 1.0, abs_tol=1e-3):
        raise ValueError(f"alignment matrix is not a proper rotation (det={det:.4f}); "
                         "mirrored or scaled transforms are not supported")
    s = A @ M[:3, 3]
    rot, tilt, psi = matrix_to_euler_np(A)
    return float(rot), float(tilt), float(psi), float(s[0]), float(s[1])
