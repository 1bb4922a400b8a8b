"""Fourier-slice projection of a batch of poses, and its exact adjoint (backprojection).

Central slices are taken with torch-fourier-slice (trilinear interpolation on the centred rfft of the
volume, Friedel conjugates handled by the library). Poses are RELION matrices A (see geometry.py): the
slice through the 3-D spectrum at 2-D frequency k is Aᵀ(k, 0), so the library — whose matrices rotate
the slice's xyz coordinates — gets Aᵀ. Shifts are RELION origins in pixels: the content of the image sits
at −origin (the origin re-centres the particle), so a projection is moved by −origin.

`pad` is the oversampling factor: the volume is zero-padded to pad·N before its FFT (finer spectral
sampling, far smaller interpolation error) and divided by the sinc² of trilinear interpolation first.
The backprojection is the exact adjoint of the whole linear map (volume → images), obtained by
reverse-mode differentiation of `project`, so <P x, y> = <x, Pᵀ y> to rounding.
"""
from __future__ import annotations

import torch
from torch_fourier_slice import extract_central_slices_rfft_3d
from torch_fourier_slice.volume_utils import separable_sinc2_correction

from .fourier import crop_center, irfft2c, pad_volume, rfft3c, shift_phase_2d

__all__ = ["prepare_volume_ft", "slice_volume_ft", "project", "backproject"]


def prepare_volume_ft(vol: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Centred rfft (pN, pN, pN//2+1) of the zero-padded, sinc²-precorrected volume (N, N, N)."""
    n = vol.shape[-1]
    if vol.shape[-3:] != (n, n, n):
        raise ValueError(f"volume must be cubic, got shape {tuple(vol.shape)}")
    if pad < 1:
        raise ValueError("pad must be >= 1")
    big = pad * n
    if big % 2:
        v = pad_volume(vol, big) if pad > 1 else vol
        return rfft3c(v / separable_sinc2_correction(tuple(v.shape[-3:]), device=v.device))
    # the same result without forming the padded volume twice: the correction is applied where the volume
    # lies (zeros elsewhere), its octants go straight to their ifftshifted places, and the centring of the
    # output's first two axes is a (−1)^(i+j) sign on the input (an fftshift by M/2 of an even-size DFT)
    lo = big // 2 - n // 2
    corr = separable_sinc2_correction((big,) * 3, device=vol.device)[lo:lo + n, lo:lo + n, lo:lo + n]
    idx = torch.cat([torch.arange(big // 2, big // 2 + n - n // 2), torch.arange(big // 2 - n // 2, big // 2)])
    src = torch.fft.ifftshift(vol / corr, dim=(-3, -2, -1))  # src[..., i] belongs at padded-ifftshifted index dst[i]
    dst = (idx - big // 2) % big
    sign = 1.0 - 2.0 * (dst % 2).to(vol.dtype)
    src = src * sign.to(vol.device)[:, None, None] * sign.to(vol.device)[None, :, None]
    d = dst.to(vol.device)
    out = vol.new_zeros(*vol.shape[:-3], big, big, big)
    out[..., d[:, None, None], d[None, :, None], d[None, None, :]] = src
    return torch.fft.rfftn(out, dim=(-3, -2, -1))


def slice_volume_ft(vol_ft: torch.Tensor, rotations: torch.Tensor,
                    fftfreq_max: float | None = None) -> torch.Tensor:
    """Central slices (B, M, M//2+1) of a prepared spectrum (M, M, M//2+1) at RELION matrices (B, 3, 3)."""
    R = rotations.transpose(-1, -2).to(torch.float32)
    return extract_central_slices_rfft_3d(vol_ft, R, fftfreq_max=fftfreq_max)


def project(vol: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor | None = None,
            pad: int = 2, vol_ft: torch.Tensor | None = None) -> torch.Tensor:
    """Real-space projections (B, N, N) of `vol` (N, N, N) at RELION poses; line integrals in voxel units.

    `vol_ft` may pass a spectrum already made by :func:`prepare_volume_ft` (same `pad`) to save an FFT.
    """
    n = vol.shape[-1]
    if vol_ft is None:
        vol_ft = prepare_volume_ft(vol, pad)
    m = vol_ft.shape[-3]
    ft = slice_volume_ft(vol_ft, rotations)
    if shifts is not None:
        ft = ft * shift_phase_2d(m, -shifts.to(torch.float32))
    img = irfft2c(ft, m)
    return crop_center(img, n, 2) if m != n else img


def backproject(images: torch.Tensor, rotations: torch.Tensor, shifts: torch.Tensor | None = None,
                pad: int = 2) -> torch.Tensor:
    """Exact adjoint of :func:`project`: images (B, N, N) → volume (N, N, N)."""
    n = images.shape[-1]
    with torch.enable_grad():
        x = torch.zeros(n, n, n, dtype=torch.float32, device=images.device, requires_grad=True)
        y = project(x, rotations, shifts, pad)
        (g,) = torch.autograd.grad(y, x, grad_outputs=images.to(torch.float32))
    return g
