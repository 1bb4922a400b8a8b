"""The 3D Flex model: latent → flow generator → per-vertex displacement → per-voxel flow → convected map.

Convection form (docs/algorithms.md §2.3, "Convection": the public description leaves it open): we use the *backward warp*
    W(x) = V(x + u(x)),
i.e. the flow u, defined on the output grid, points from where density ends up to where it comes from
in the canonical map. It is sampled trilinearly (grid_sample), so W is linear in V and autograd gives
the exact adjoint (a trilinear scatter) that the high-resolution reconstruction needs. It conserves mass
up to det(I + ∇u), which the rigidity prior keeps near 1; tests measure the mass change.

Projection of the deformed map is done in real space in one pass: for the rotated-frame grid point r,
the canonical position is x = Aᵀr (RELION convention, geometry.py) and the sample is V(x + u(x)); the
sum over r_z is the projection. Only the sub-cube that can hold density (mask radius + motion margin)
is sampled. Shifts and CTF are applied in Fourier space by the caller.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .mesh import Mesh, rasterize_weights

__all__ = ["FlowGenerator", "MeshRaster", "deformation_gradients", "rigidity_penalty", "project_warped",
           "warp_volume", "ray_positions", "project_positions", "splat_project", "project_warped_splat"]


class FlowGenerator(nn.Module):
    """MLP from a K-dim latent to displacements (n_vertices, 3) in Å; starts at zero flow."""

    def __init__(self, k: int, n_vertices: int, layers: int = TrainConfig.layers, hidden: int = TrainConfig.hidden):
        super().__init__()
        if k < 1 or layers < 1 or hidden < 1:
            raise ValueError("latent dimension, layers and hidden units must be >= 1")
        dims = [k] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(hidden, 3 * n_vertices)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.k, self.n_vertices = k, n_vertices

    def forward(self, z: torch.Tensor, return_activations: bool = False):
        h = z
        acts = []
        for lin in self.hidden:
            h = F.silu(lin(h))
            acts.append(h)
        d = self.out(h).view(*z.shape[:-1], self.n_vertices, 3)
        return (d, acts) if return_activations else d


class MeshRaster:
    """Barycentric interpolation of vertex displacements on a grid of box m (cached per box).

    The interpolation is a sparse (voxels-in-mesh × vertices) matrix with 4 non-zeros a row, so the flow of a
    whole batch is one sparse-dense product (and its adjoint one more), not a (B, voxels, 4, 3) gather.
    """

    def __init__(self, mesh: Mesh, m: int, device: torch.device | str = "cpu"):
        (vox, _), verts, bary = rasterize_weights(mesh, m)
        self.m = m
        self.vox = torch.as_tensor(vox, device=device)
        self.verts = torch.as_tensor(verts, device=device)
        self.bary = torch.as_tensor(bary, dtype=torch.float32, device=device)
        self.scale = mesh.N / m  # mesh-box voxels per m-box voxel
        rows = torch.arange(len(vox), device=device).repeat_interleave(4)
        self.interp = torch.sparse_coo_tensor(torch.stack([rows, self.verts.reshape(-1)]), self.bary.reshape(-1),
                                              (len(vox), len(mesh.points)), check_invariants=False).coalesce()
        z, y, x = vox // (m * m), (vox // m) % m, vox % m
        self.pos = torch.as_tensor(np.stack([x, y, z], 1) - m // 2, dtype=torch.float32, device=device)

    def flow_vox(self, d: torch.Tensor, apix_m: float) -> torch.Tensor:
        """u (B, nvox, 3) in voxels of box m at the mesh's voxels (`pos`) from displacements d (B, V, 3) in Å."""
        b, v, _ = d.shape
        u = torch.sparse.mm(self.interp, d.permute(1, 0, 2).reshape(v, 3 * b))  # (nvox, B·3)
        return u.view(-1, b, 3).permute(1, 0, 2) / apix_m

    def flow(self, d: torch.Tensor, apix_m: float) -> torch.Tensor:
        """u (B, m, m, m, 3) in voxels of box m (xyz) from displacements d (B, V, 3) in Å."""
        b = d.shape[0]
        u_in = self.flow_vox(d, apix_m)
        u = torch.zeros(b, self.m ** 3, 3, dtype=d.dtype, device=d.device)
        u = u.index_copy(1, self.vox, u_in)
        return u.view(b, self.m, self.m, self.m, 3)


def deformation_gradients(d: torch.Tensor, cells: torch.Tensor, rest_inv: torch.Tensor) -> torch.Tensor:
    """F = I + ΔD·Dm⁻¹ (B, C, 3, 3) per cell from vertex displacements d (B, V, 3) (Å)."""
    dc = d[:, cells]  # (B, C, 4, 3)
    dD = torch.stack([dc[:, :, 1] - dc[:, :, 0], dc[:, :, 2] - dc[:, :, 0], dc[:, :, 3] - dc[:, :, 0]], -1)
    return torch.eye(3, dtype=d.dtype, device=d.device) + dD @ rest_inv


def rigidity_penalty(Fg: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_cells w·‖FᵀF − I‖²_F per batch item: zero exactly for rotations, = Σ (σ²−1)² over singular values.

    Chosen over Σ(σ−1)² through an SVD, whose gradient is unstable where singular values coincide — which
    is exactly the rest state (all σ = 1).
    """
    C = Fg.transpose(-1, -2) @ Fg - torch.eye(3, dtype=Fg.dtype, device=Fg.device)
    return (C.square().sum((-1, -2)) * weights).sum(-1)


def _to_grid(p: torch.Tensor, m: int) -> torch.Tensor:
    """Voxel positions relative to the centre m//2 → grid_sample coordinates (align_corners=True)."""
    return (p + m // 2) * (2.0 / (m - 1)) - 1.0


def warp_volume(vol: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """W(x) = V(x + u(x)) on the grid: vol (m, m, m), u (B, m, m, m, 3) xyz voxels → (B, m, m, m)."""
    m = vol.shape[-1]
    g = torch.arange(m, dtype=vol.dtype, device=vol.device) - m // 2
    zz, yy, xx = torch.meshgrid(g, g, g, indexing="ij")
    base = torch.stack([xx, yy, zz], -1)
    grid = _to_grid(base[None] + u, m)
    b = u.shape[0]
    out = F.grid_sample(vol[None, None].expand(b, 1, m, m, m), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=True)
    return out[:, 0]


def ray_positions(m: int, rotations: torch.Tensor, u: torch.Tensor | None = None, radius: float | None = None,
                  dtype=torch.float32) -> torch.Tensor:
    """Canonical-map sample positions (B, s³, 3) (voxels from the centre, xyz) of the projection rays:
    Aᵀr + u(Aᵀr) for the rotated-frame points r of the centred sub-cube of half-width `radius`.

    They depend only on pose and flow, so a solver that keeps both fixed can compute them once."""
    b = rotations.shape[0]
    h = m // 2 - 1 if radius is None else int(min(m // 2 - 1, math.ceil(radius)))
    g = torch.arange(-h, h + 1, dtype=dtype, device=rotations.device)
    rz, ry, rx = torch.meshgrid(g, g, g, indexing="ij")
    r = torch.stack([rx, ry, rz], -1).view(-1, 3)  # rotated-frame points, xyz
    x = torch.einsum("bji,nj->bni", rotations.to(dtype), r)  # Aᵀ r → (B, n, 3)
    if u is not None:
        ux = F.grid_sample(u.permute(0, 4, 1, 2, 3), _to_grid(x, m).reshape(b, 1, 1, -1, 3), mode="bilinear",
                           padding_mode="zeros", align_corners=True)  # (B, 3, 1, 1, n)
        x = x + ux.view(b, 3, -1).transpose(1, 2)
    return x


def project_positions(vol: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Projections (B, m, m): V sampled at ray positions x (B, s³, 3) from :func:`ray_positions`, summed along z."""
    m = vol.shape[-1]
    b = x.shape[0]
    s = round(x.shape[1] ** (1 / 3))
    h = (s - 1) // 2
    vals = F.grid_sample(vol[None, None], _to_grid(x, m).reshape(1, b * s, s, s, 3), mode="bilinear",
                         padding_mode="zeros", align_corners=True)  # (1, 1, B*s, s, s)
    proj = vals.view(b, s, s, s).sum(1)  # sum over r_z → (B, y, x)
    lo = m // 2 - h
    return F.pad(proj, [lo, m - lo - s, lo, m - lo - s])


def project_warped(vol: torch.Tensor, rotations: torch.Tensor, u: torch.Tensor | None = None,
                   radius: float | None = None) -> torch.Tensor:
    """Projections (B, m, m) of V(x + u(x)) at RELION matrices (B, 3, 3); line integrals in voxel units.

    `radius` (voxels) bounds where density can be: only the centred sub-cube of that half-width is sampled.
    """
    return project_positions(vol, ray_positions(vol.shape[-1], rotations, u, radius, vol.dtype))


def splat_project(vals: torch.Tensor, xy: torch.Tensor, m: int) -> torch.Tensor:
    """Projections (B, m, m): values (B, n) deposited bilinearly at image positions xy (B, n, 2) (pixels from
    the centre, x then y). Linear in `vals`; its adjoint (a bilinear gather) comes from autograd."""
    b = vals.shape[0]
    p = xy + m // 2
    p0 = p.floor()
    f = p - p0
    i0 = p0.long()
    out = vals.new_zeros(b, m * m)
    for dy in (0, 1):
        wy = f[..., 1] if dy else 1 - f[..., 1]
        iy = i0[..., 1] + dy
        for dx in (0, 1):
            wx = f[..., 0] if dx else 1 - f[..., 0]
            ix = i0[..., 0] + dx
            ok = (ix >= 0) & (ix < m) & (iy >= 0) & (iy < m)
            idx = iy.clamp(0, m - 1) * m + ix.clamp(0, m - 1)
            out = out.scatter_add(1, idx, vals * (wx * wy * ok))
    return out.view(b, m, m)


def project_warped_splat(vol: torch.Tensor, rotations: torch.Tensor, pos: torch.Tensor,
                         u: torch.Tensor | None = None) -> torch.Tensor:
    """Projections (B, m, m) of W(x) = V(x + u(x)) by splatting W's voxels x (`pos`, (n, 3) xyz from the centre).

    Training's fast projector: W is sampled only at the n voxels that can hold density (the mesh's voxels,
    where the flow is exact, no resampling of u), and each is deposited at its rotated position (A x)_xy.
    The image positions do not depend on the flow (W lives on the canonical grid), so the only gradient
    path is one trilinear sample per voxel. `u` (B, n, 3) in voxels, or None for the rigid map.
    """
    m = vol.shape[-1]
    b = rotations.shape[0]
    x = pos[None].expand(b, -1, -1) if u is None else pos[None] + u
    vals = F.grid_sample(vol[None, None], _to_grid(x, m).reshape(1, b, -1, 1, 3), mode="bilinear",
                         padding_mode="zeros", align_corners=True).view(b, -1)
    xy = torch.einsum("bij,nj->bni", rotations[:, :2].to(vol.dtype), pos)  # (A x)_xy
    return splat_project(vals, xy, m)
