"""The working grid of 3DVA and a multichannel band-limited slicer.

3DVA works on a Fourier-cropped box of `m` pixels (Nyquist ≥ the filter frequency). Volumes live on that
m³ grid in real space; for slicing they are zero-padded to 2m and sinc²-precorrected exactly as
:func:`flexplugin.engine.projector.prepare_volume_ft` does (pad 2), and stacked as channels
(C, 2m, 2m, m+1).

:func:`slice_band` samples all channels at once, but only at the 2-D frequencies of an **m**-pixel image
inside the band |k| < 0.5 cycles/px (the E-step needs nothing else). The samples equal
``slice_volume_ft(channel, A)[..., ::2, ::2]`` at those points (the even frequencies of the 2m-grid slice
are the m-grid frequencies; a test pins this), while costing ~1/5 of the library call per channel: no
samples outside the band, one coordinate computation for all channels. The interpolation is the
library's (torch-image-interpolation trilinear sampling of the centred rfft, Friedel mates conjugated).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch_image_interpolation import sample_image_3d

from ..fourier import freq_grid_2d, radius_2d

__all__ = ["Band", "column_weights", "make_band", "scatter_band", "slice_band", "slice_coords"]


def column_weights(m: int, device=None) -> torch.Tensor:
    """(m, m//2+1) multiplicity of each rfft coefficient in the full 2-D spectrum: 1 on the self-conjugate
    columns kx = 0 and kx = m/2, 2 elsewhere, so that Σ_half w|F|² = Σ_full |F|² (Parseval)."""
    w = torch.full((m, m // 2 + 1), 2.0, device=device)
    w[:, 0] = 1.0
    w[:, -1] = 1.0
    return w


@dataclass
class Band:
    """The frequencies of an m-pixel centred rfft used by the E-step (DC and |k| ≥ 0.5 excluded)."""

    m: int
    mask: torch.Tensor  # (m, m//2+1) bool
    flat_index: torch.Tensor  # (nb,) index into the flattened (m, m//2+1) grid
    k2d: torch.Tensor  # (nb, 2) (ky, kx) cycles/px of the m box
    radius: torch.Tensor  # (nb,) |k| cycles/px
    shell: torch.Tensor  # (nb,) integer shell round(|k|·m)
    weight: torch.Tensor  # (nb,) column multiplicity (1 or 2)

    @property
    def size(self) -> int:
        return int(self.flat_index.numel())

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(..., m, m//2+1) → (..., nb)."""
        return x.reshape(*x.shape[:-2], -1)[..., self.flat_index]


def make_band(m: int, device=None, kmin: float = 0.0, kmax_px: float | None = None) -> Band:
    """Band of the m-grid: 0 < |k| < 0.5 (and |k| > kmin), or 0 < |k| ≤ kmax_px Fourier pixels when given (the
    3D Flex training band)."""
    r = radius_2d(m, device)
    upper = (r < 0.5) if kmax_px is None else (r * m <= kmax_px)
    mask = upper & (r > max(kmin, 0.0))
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    k = freq_grid_2d(m, device).reshape(-1, 2)[idx]
    rb = r.reshape(-1)[idx]
    w = column_weights(m, device).reshape(-1)[idx]
    return Band(m, mask, idx, k, rb, torch.round(rb * m).long(), w)


def scatter_band(values: torch.Tensor, band: Band) -> torch.Tensor:
    """(..., nb) → (..., m, m//2+1) with zeros outside the band."""
    m = band.m
    out = torch.zeros(*values.shape[:-1], m * (m // 2 + 1), dtype=values.dtype, device=values.device)
    out[..., band.flat_index] = values
    return out.reshape(*values.shape[:-1], m, m // 2 + 1)


def slice_coords(rotations: torch.Tensor, band: Band, M: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the band's 2-D frequencies land in a centred rfft on an M-grid: array coordinates (B, nb, 3) as
    (z, y, x), and whether each sample is the Friedel mate (x < 0 mirrored, so conjugate it)."""
    A = rotations.to(torch.float32)
    k = band.k2d.to(A.device)
    # xyz = Aᵀ (kx, ky, 0): component j = A[0, j] kx + A[1, j] ky
    xyz = k[None, :, 1, None] * A[:, None, 0, :] + k[None, :, 0, None] * A[:, None, 1, :]  # (B, nb, 3)
    conj = xyz[..., 0] < 0
    xyz = torch.where(conj[..., None], -xyz, xyz)
    coords = torch.stack([(xyz[..., 2] + 0.5) * M, (xyz[..., 1] + 0.5) * M, xyz[..., 0] * M], -1)
    return coords, conj


def slice_band(vol_ft: torch.Tensor, rotations: torch.Tensor, band: Band) -> torch.Tensor:
    """Samples (B, C, nb) of prepared spectra (C, 2m, 2m, m+1) at the band of m-pixel images.

    `rotations` are RELION matrices A (B, 3, 3): the 2-D frequency (kx, ky) samples Aᵀ(kx, ky, 0).
    """
    M = vol_ft.shape[-3]
    if M != 2 * band.m:
        raise ValueError(f"spectrum grid {M} does not match 2 × band box {band.m}")
    coords, conj = slice_coords(rotations, band, M)
    s = sample_image_3d(vol_ft, coords, interpolation="trilinear")  # (B, nb, C)
    s = torch.where(conj[..., None], s.conj(), s)
    return s.permute(0, 2, 1)


_SLICE_GRID_CACHE: dict = {}


def _slice_points(M: int, fftfreq_max: float | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of an (M, M//2+1) centred-rfft slice that torch-fourier-slice inserts: flat indices and
    (ky, kx) fftfreq. Same selection as the library: |k| ≤ fftfreq_max, and not (kx = 0, ky < 0)."""
    key = (M, fftfreq_max, str(device))
    if key not in _SLICE_GRID_CACHE:
        k = freq_grid_2d(M, device)  # (M, M//2+1, 2) ky, kx
        sel = ~((k[..., 1] == 0) & (k[..., 0] < 0))
        if fftfreq_max is not None:
            sel &= k.norm(dim=-1) <= fftfreq_max
        idx = torch.nonzero(sel.reshape(-1)).squeeze(1)
        _SLICE_GRID_CACHE[key] = (idx, k.reshape(-1, 2)[idx])
    return _SLICE_GRID_CACHE[key]


def insert_slices(real_vals: torch.Tensor | None, cplx_vals: torch.Tensor | None, rotations: torch.Tensor,
                  M: int, fftfreq_max: float | None = None, out_real: torch.Tensor | None = None,
                  out_cplx: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Trilinear insertion of central slices into an (M, M, M//2+1) centred rfft, many channels at once.

    The same operator as torch-fourier-slice's ``insert_central_slices_rfft_3d_multichannel`` (same point
    selection, conjugation of points that land in the x < 0 half, trilinear splat with floor/ceil corners,
    Friedel mirror of the x = 0 plane), which the reconstructor uses; a test pins the two together. It is
    written with flat ``index_add_`` calls, finds the Friedel-mirror candidates once, and keeps real
    channels real (L needs no imaginary part): 0.22 s instead of 1.47 s of CPU time for 256 slices of a
    128-grid with the 3DVA M-step's 6 real + 3 complex channels.

    real_vals (B, Cr, M, M//2+1) float, cplx_vals (B, Cc, M, M//2+1) complex, rotations = library matrices
    (B, 3, 3) that rotate the slice's xyz coordinates (Aᵀ for RELION A). Sums are added to out_* if given.
    """
    dev = rotations.device
    W = M // 2 + 1
    idx, k = _slice_points(M, fftfreq_max, dev)
    parts = []
    cr = 0 if real_vals is None else real_vals.shape[1]
    cc = 0 if cplx_vals is None else cplx_vals.shape[1]
    B = rotations.shape[0]
    if cr:
        parts.append(real_vals.reshape(B, cr, -1)[..., idx])
    if cc:
        cv = cplx_vals.reshape(B, cc, -1)[..., idx]
        parts += [cv.real, cv.imag]
    vals = torch.cat(parts, 1).transpose(1, 2)  # (B, P, Cr + 2Cc)
    imag_sl = slice(cr + cc, cr + 2 * cc)
    A = rotations.to(torch.float32)
    # xyz of slice point (kx, ky, 0) rotated: A[:, :, 0] kx + A[:, :, 1] ky
    xyz = k[None, :, 1, None] * A[:, None, :, 0] + k[None, :, 0, None] * A[:, None, :, 1]  # (B, P, 3)
    conj = xyz[..., 0] < 0
    xyz = torch.where(conj[..., None], -xyz, xyz)
    cz, cy, cx = (xyz[..., 2] + 0.5) * M, (xyz[..., 1] + 0.5) * M, xyz[..., 0] * M
    inside = (cz >= 0) & (cz <= M - 1) & (cy >= 0) & (cy <= M - 1) & (cx >= 0) & (cx <= W - 1)
    cz, cy, cx, vals = cz[inside], cy[inside], cx[inside], vals[inside]  # vals now (n, C) contiguous
    if cc:
        cj = conj[inside]
        vals[cj, imag_sl] = -vals[cj, imag_sl]
    z0, y0, x0 = cz.floor(), cy.floor(), cx.floor()
    tz, ty, tx = cz - z0, cy - y0, cx - x0
    z0, y0, x0 = z0.long(), y0.long(), x0.long()
    z1, y1, x1 = cz.ceil().long(), cy.ceil().long(), cx.ceil().long()
    C = vals.shape[-1]
    if out_real is None and cr:
        out_real = torch.zeros(cr, M, M, W, device=dev, dtype=torch.float32)
    if out_cplx is None and cc:
        out_cplx = torch.zeros(cc, M, M, W, device=dev, dtype=torch.complex64)
    acc = torch.zeros(M * M * W, C, device=dev, dtype=torch.float32)
    # corners on the x = 0 plane also go to their Friedel mirror (as the library does): only points with
    # x0 = 0 (and x1 = 0 when cx is exactly 0) can have such corners, so find them once
    near0 = {0: torch.nonzero(x0 == 0).squeeze(1), 1: torch.nonzero(x1 == 0).squeeze(1)}
    for zi, wz in ((z0, 1 - tz), (z1, tz)):
        for yi, wy in ((y0, 1 - ty), (y1, ty)):
            wzy = wz * wy
            base = (zi * M + yi) * W
            for side, (xi, wx) in enumerate(((x0, 1 - tx), (x1, tx))):
                w = wzy * wx
                acc.index_add_(0, base + xi, vals * w[:, None])
                sel = near0[side]
                if sel.numel():
                    zs, ys = zi[sel], yi[sel]
                    keep = ~((zs == M // 2) & (ys == M // 2))  # not the origin
                    sel, zs, ys = sel[keep], zs[keep], ys[keep]
                    vm = vals[sel] * w[sel, None]
                    if cc:
                        vm[:, imag_sl] = -vm[:, imag_sl]
                    acc.index_add_(0, (((M - zs) % M) * M + (M - ys) % M) * W, vm)
    acc = acc.T.reshape(C, M, M, W)
    if cr:
        out_real += acc[:cr]
    if cc:
        out_cplx += torch.complex(acc[cr:cr + cc], acc[cr + cc:])
    return out_real, out_cplx
