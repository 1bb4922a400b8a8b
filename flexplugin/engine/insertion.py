"""Insertion of central slices into a 3-D centred-rfft grid: the one backprojection kernel of the package.

The Wiener reconstruction (engine/reconstruct.py), the 3DVA M-step and display maps (engine/va3d) and the 3D Flex
Wiener starts all add their spectra with :func:`insert_slices`. A slice is an (n, n//2+1) centred rfft of an
n-pixel image; its frequency k (cycles/px of the image, |k| ≤ fftfreq_max) lands at the array coordinate
(z, y, x) = ((kz + ½)·M, (ky + ½)·M, kx·M) of an (M, M, M//2+1) grid, with (kx, ky, kz) = R·(kx, ky, 0) for
the rotation R (Aᵀ for RELION's A). With n = M the slice comes from an image zero-padded to the grid's size; with
n = M/pad it is the image's own spectrum placed on a pad× oversampled grid, as RELION's backprojector does
(pad × fewer samples per axis to grid; docs/reconstruction.md compares the two).

Points whose x lands below 0 are mirrored to −k and conjugated (Hermitian symmetry), and corners on the x = 0
plane also receive the Friedel mate of their value, so the result is the half of a Hermitian grid: the same
operator as torch-fourier-slice's ``insert_central_slices_rfft_3d_multichannel`` (tests pin the two together
for n = M, and for n = M/2 through zero-stuffed slices) and the adjoint of trilinear slicing of a Hermitian volume (a test pins that too). Real channels
(the CTF² weights) stay real. The 8 corners of all points of a batch are scattered at once, point-major (one
point's voxels stay together in memory), with ``index_add_``: one flat scatter per channel for a few channels
(2.7× faster than corner by corner on 256 images at box 64), rows of all channels for many (the 3DVA M-step's
6 real + 3 complex, 1.5×), and straight into the caller's grids when a batch has fewer samples than the grid
has voxels (box ≥ 128), where a grid-sized temporary would cost more than the scatter (docs/reconstruction.md).
"""
from __future__ import annotations

import torch

from .fourier import freq_grid_2d

__all__ = ["insert_slices", "slice_points"]

_POINTS_CACHE: dict = {}
ROWS_FROM = 4  # above this many float channels, scatter voxel rows instead of one channel at a time


def slice_points(n: int, fftfreq_max: float | None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of an (n, n//2+1) centred-rfft slice that are inserted: flat indices and (ky, kx) cycles/px.

    Same selection as torch-fourier-slice: |k| ≤ fftfreq_max (all when None), and not (kx = 0, ky < 0), whose
    information the Friedel mate (kx = 0, −ky) already carries."""
    key = (n, fftfreq_max, str(device))
    if key not in _POINTS_CACHE:
        k = freq_grid_2d(n, device)  # (n, n//2+1, 2) ky, kx
        sel = ~((k[..., 1] == 0) & (k[..., 0] < 0))
        if fftfreq_max is not None:
            sel &= k.norm(dim=-1) <= fftfreq_max
        idx = torch.nonzero(sel.reshape(-1)).squeeze(1)
        _POINTS_CACHE[key] = (idx, k.reshape(-1, 2)[idx])
    return _POINTS_CACHE[key]


def _flat_values(real_vals: torch.Tensor | None, cplx_vals: torch.Tensor | None, idx: torch.Tensor
                 ) -> tuple[torch.Tensor, int, int]:
    """(C, B·P) float rows: real channels, then real and imaginary parts of the complex ones."""
    parts = []
    cr = 0 if real_vals is None else real_vals.shape[1]
    cc = 0 if cplx_vals is None else cplx_vals.shape[1]
    if real_vals is not None and cr:
        parts.append(real_vals.flatten(-2)[..., idx].to(torch.float32))
    if cplx_vals is not None and cc:
        cv = cplx_vals.flatten(-2)[..., idx].to(torch.complex64)
        parts += [cv.real, cv.imag]
    return torch.cat(parts, 1).transpose(0, 1).reshape(cr + 2 * cc, -1), cr, cc


def _scatter_direct(vals: torch.Tensor, cr: int, cc: int, cz: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor,
                    M: int, out_real: torch.Tensor | None, out_cplx: torch.Tensor | None) -> None:
    """Trilinear splat of (C, n) values at grid coordinates straight into the output grids (complex ones as
    rows (re, im) of their float view). The lower corner is clamped to the last-but-one plane, so a coordinate
    exactly on the last plane puts weight 1 on its upper corner instead (same sums, all corners inside)."""
    dev, W = cz.device, M // 2 + 1
    z0, y0, x0 = cz.floor().clamp(max=M - 2), cy.floor().clamp(max=M - 2), cx.floor().clamp(max=W - 2)
    tz, ty, tx = cz - z0, cy - y0, cx - x0
    z0, y0, x0 = z0.long(), y0.long(), x0.long()
    wzy = (torch.stack([1 - tz, tz], 1)[:, :, None] * torch.stack([1 - ty, ty], 1)[:, None, :]).reshape(-1, 4)
    w8 = (wzy[:, :, None] * torch.stack([1 - tx, tx], 1)[:, None, :]).reshape(-1, 8)
    offsets = torch.tensor([dz * M * W + dy * W + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
                           device=dev)
    flat = (((z0 * M + y0) * W + x0)[:, None] + offsets).reshape(-1)
    # corners on the x = 0 plane (dx = 0 of points with x0 = 0) also get the Friedel mate of their value
    sel = torch.nonzero(x0 == 0).squeeze(1)
    o = torch.tensor([0, 1], device=dev)
    mz = (z0[sel][:, None, None] + o[None, :, None]).expand(-1, 2, 2).reshape(-1)
    my = (y0[sel][:, None, None] + o[None, None, :]).expand(-1, 2, 2).reshape(-1)
    wm = (wzy[sel] * (1 - tx[sel])[:, None]).reshape(-1)
    keep = ~((mz == M // 2) & (my == M // 2))  # the origin is its own mate
    mflat = (((M - mz[keep]) % M) * M + (M - my[keep]) % M) * W
    wm = wm[keep]
    # insert_slices comes here only with out_real given when cr > 0 and out_cplx when cc > 0
    if out_real is not None:
        for c in range(cr):
            t = out_real[c].view(-1)
            t.index_add_(0, flat, (vals[c][:, None] * w8).reshape(-1))
            t.index_add_(0, mflat, vals[c][sel].repeat_interleave(4)[keep] * wm)
    if out_cplx is not None:
        for c in range(cc):
            t = torch.view_as_real(out_cplx[c]).view(-1, 2)
            pair = torch.stack([vals[cr + c], vals[cr + cc + c]], 1)  # (n, 2) re, im
            t.index_add_(0, flat, (pair[:, None, :] * w8[:, :, None]).reshape(-1, 2))
            mate = pair[sel].repeat_interleave(4, 0)[keep] * torch.tensor([1.0, -1.0], device=dev)
            t.index_add_(0, mflat, mate * wm[:, None])


def insert_slices(real_vals: torch.Tensor | None, cplx_vals: torch.Tensor | None, rotations: torch.Tensor,
                  M: int, fftfreq_max: float | None = None, out_real: torch.Tensor | None = None,
                  out_cplx: torch.Tensor | None = None, interpolation: str = "trilinear"
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Insert (add) central slices into an (M, M, M//2+1) centred rfft, many channels at once.

    real_vals (B, Cr, n, n//2+1) float and cplx_vals (B, Cc, n, n//2+1) complex (either may be None), with
    n ≤ M; rotations (B, 3, 3) rotate the slice's xyz frequency (Aᵀ for RELION's A); fftfreq_max in cycles/px
    of the n-pixel slice. Sums are added to out_real (Cr, M, M, M//2+1) / out_cplx (Cc, …) when given, else to
    new zero grids; returns both. `interpolation` "trilinear" splats each value on its 8 neighbours with
    trilinear weights; "nearest" adds it to the nearest voxel (8× fewer scatters).
    """
    if interpolation not in ("trilinear", "nearest"):
        raise ValueError(f"interpolation must be 'trilinear' or 'nearest', got {interpolation!r}")
    ref = real_vals if real_vals is not None else cplx_vals
    if ref is None:
        raise ValueError("insert_slices needs real or complex values")
    n = ref.shape[-2]
    if n > M or ref.shape[-1] != n // 2 + 1:
        raise ValueError(f"slices {tuple(ref.shape[-2:])} do not fit a {M}-grid centred rfft")
    dev = rotations.device
    W = M // 2 + 1
    idx, k = slice_points(n, fftfreq_max, dev)
    vals, cr, cc = _flat_values(real_vals, cplx_vals, idx)  # (C, B·P)
    C = vals.shape[0]
    A = rotations.to(torch.float32)
    # xyz of slice point (kx, ky, 0) rotated: A[:, :, 0] kx + A[:, :, 1] ky
    xyz = (k[None, :, 1, None] * A[:, None, :, 0] + k[None, :, 0, None] * A[:, None, :, 1]).reshape(-1, 3)
    conj = xyz[:, 0] < 0
    xyz = torch.where(conj[:, None], -xyz, xyz)
    cz, cy, cx = (xyz[:, 2] + 0.5) * M, (xyz[:, 1] + 0.5) * M, xyz[:, 0] * M
    if interpolation == "nearest":
        cz, cy, cx = cz.round(), cy.round(), cx.round()
    inside = (cz >= 0) & (cz <= M - 1) & (cy >= 0) & (cy <= M - 1) & (cx >= 0) & (cx <= W - 1)
    if not bool(inside.all()):
        cz, cy, cx, conj, vals = cz[inside], cy[inside], cx[inside], conj[inside], vals[:, inside]
    if cc:
        vals[cr + cc:] = torch.where(conj, -vals[cr + cc:], vals[cr + cc:])
    direct = (interpolation == "trilinear" and C <= ROWS_FROM and 8 * cz.numel() < M * M * W
              and (not cr or (out_real is not None and out_real.is_contiguous()))
              and (not cc or (out_cplx is not None and out_cplx.is_contiguous())))
    if direct:  # few samples on a large grid: scatter straight into the outputs, no grid-sized temporaries
        _scatter_direct(vals, cr, cc, cz, cy, cx, M, out_real, out_cplx)
        return out_real, out_cplx
    # the accumulator has one spare plane after the last z, y and x: corners that fall there carry weight 0
    # (a coordinate exactly on the grid's last plane), so no clamping is needed; it is cut off at the end
    Mp, Wp = M + 1, W + 1
    acc = torch.zeros(C if C <= ROWS_FROM else 0, Mp * Mp * Wp, device=dev, dtype=torch.float32)
    flip = torch.ones(C, 1, device=dev)
    flip[cr + cc:] = -1.0  # the Friedel mate's imaginary parts
    if interpolation == "nearest":
        z, y, x = cz.long(), cy.long(), cx.long()
        flat, v = (z * Mp + y) * Wp + x, vals
        mirror = torch.nonzero(x == 0).squeeze(1)
        mz, my, mv = z[mirror], y[mirror], vals[:, mirror]
    else:
        z0, y0, x0 = cz.floor(), cy.floor(), cx.floor()
        tz, ty, tx = cz - z0, cy - y0, cx - x0
        z0, y0, x0 = z0.long(), y0.long(), x0.long()
        # the 8 corners of each point, point-major so that one point's voxels stay together in memory
        wzy = (torch.stack([1 - tz, tz], 1)[:, :, None] * torch.stack([1 - ty, ty], 1)[:, None, :]).reshape(-1, 4)
        w8 = (wzy[:, :, None] * torch.stack([1 - tx, tx], 1)[:, None, :]).reshape(-1, 8)
        offsets = torch.tensor([dz * Mp * Wp + dy * Wp + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
                               device=dev)
        flat = (((z0 * Mp + y0) * Wp + x0)[:, None] + offsets).reshape(-1)
        v = (vals[:, :, None] * w8).reshape(C, -1)
        # corners on the x = 0 plane (dx = 0 of points with x0 = 0) also get the Friedel mate of their value
        sel = torch.nonzero(x0 == 0).squeeze(1)
        o = torch.tensor([0, 1], device=dev)
        mz = (z0[sel][:, None, None] + o[None, :, None]).expand(-1, 2, 2).reshape(-1)
        my = (y0[sel][:, None, None] + o[None, None, :]).expand(-1, 2, 2).reshape(-1)
        mv = (vals[:, sel, None] * wzy[sel][None] * (1 - tx[sel])[None, :, None]).reshape(C, -1)
    keep = ~((mz == M // 2) & (my == M // 2)) & (mz < M) & (my < M)  # the origin is its own mate
    mflat = (((M - mz[keep]) % M) * Mp + (M - my[keep]) % M) * Wp
    mv = mv[:, keep] * flip
    if C <= ROWS_FROM:  # few channels: one flat scatter per channel
        for c in range(C):
            acc[c].index_add_(0, flat, v[c])
            acc[c].index_add_(0, mflat, mv[c])
        acc = acc.reshape(C, Mp, Mp, Wp)[:, :M, :M, :W]
    else:  # many channels (3DVA's M-step): voxels as rows of C values, one scatter of rows
        rows = torch.zeros(Mp * Mp * Wp, C, device=dev, dtype=torch.float32)
        rows.index_add_(0, flat, v.T)
        rows.index_add_(0, mflat, mv.T)
        acc = rows.T.reshape(C, Mp, Mp, Wp)[:, :M, :M, :W]
    if cr:
        out_real = acc[:cr] if out_real is None else out_real.add_(acc[:cr])
    if cc:
        cplx = torch.complex(acc[cr:cr + cc], acc[cr + cc:])
        out_cplx = cplx if out_cplx is None else out_cplx.add_(cplx)
    return out_real, out_cplx
