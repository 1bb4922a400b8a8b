"""Centred FFT helpers, Fourier crop/pad, shift phases, Butterworth filters and FSC.

Layout: real images are (..., N, N) indexed [y, x] with the centre at N//2 (RELION/MRC). Their
"centred rfft" is the rfft2 of the ifftshifted image with the y axis fftshifted, shape (..., N, N//2+1),
DC at [N//2, 0]: the layout torch-fourier-slice uses, so slices come out ready to compare.
Volumes likewise: (..., N, N, N) [z, y, x] → (..., N, N, N//2+1) with z and y fftshifted.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "rfft2c", "irfft2c", "rfft3c", "irfft3c", "freq_grid_2d", "freq_grid_3d", "radius_2d", "radius_3d",
    "fourier_crop_2d", "fourier_crop_3d", "fourier_pad_2d", "shift_phase_2d", "butterworth_lowpass",
    "butterworth_highpass", "lowpass_volume", "fsc", "fsc_resolution", "shell_frequencies", "pad_volume",
    "crop_center", "pad_images",
]


def rfft2c(img: torch.Tensor) -> torch.Tensor:
    """Centred rfft of real images (..., N, N) → (..., N, N//2+1)."""
    ft = torch.fft.rfftn(torch.fft.ifftshift(img, dim=(-2, -1)), dim=(-2, -1))
    return torch.fft.fftshift(ft, dim=(-2,))


def irfft2c(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft2c` for an (..., n, n) real image."""
    img = torch.fft.irfftn(torch.fft.ifftshift(ft, dim=(-2,)), s=(n, n), dim=(-2, -1))
    return torch.fft.fftshift(img, dim=(-2, -1))


def rfft3c(vol: torch.Tensor) -> torch.Tensor:
    """Centred rfft of real volumes (..., N, N, N) → (..., N, N, N//2+1)."""
    ft = torch.fft.rfftn(torch.fft.ifftshift(vol, dim=(-3, -2, -1)), dim=(-3, -2, -1))
    return torch.fft.fftshift(ft, dim=(-3, -2))


def irfft3c(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`rfft3c`."""
    vol = torch.fft.irfftn(torch.fft.ifftshift(ft, dim=(-3, -2)), s=(n, n, n), dim=(-3, -2, -1))
    return torch.fft.fftshift(vol, dim=(-3, -2, -1))


def freq_grid_2d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, n//2+1, 2) frequencies (ky, kx) in cycles/pixel for the centred rfft layout."""
    ky = torch.fft.fftshift(torch.fft.fftfreq(n, device=device, dtype=dtype))
    kx = torch.fft.rfftfreq(n, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(ky, kx, indexing="ij"), -1)


def freq_grid_3d(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(n, n, n//2+1, 3) frequencies (kz, ky, kx) in cycles/pixel for the centred rfft layout."""
    k = torch.fft.fftshift(torch.fft.fftfreq(n, device=device, dtype=dtype))
    kx = torch.fft.rfftfreq(n, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(k, k, kx, indexing="ij"), -1)


def radius_2d(n: int, device=None) -> torch.Tensor:
    """|k| in cycles/pixel on the centred rfft grid (n, n//2+1)."""
    return freq_grid_2d(n, device).norm(dim=-1)


def radius_3d(n: int, device=None) -> torch.Tensor:
    """|k| in cycles/pixel on the centred rfft grid (n, n, n//2+1)."""
    return freq_grid_3d(n, device).norm(dim=-1)


def _crop_ft_axes(ft: torch.Tensor, n: int, m: int, shifted_dims: tuple[int, ...]) -> torch.Tensor:
    lo = n // 2 - m // 2
    for d in shifted_dims:
        ft = ft.narrow(d, lo, m)
    return ft.narrow(-1, 0, m // 2 + 1)


def fourier_crop_2d(img: torch.Tensor, m: int) -> torch.Tensor:
    """Downsample real images (..., N, N) to (..., m, m) by cropping their spectrum (m ≤ N, even)."""
    n = img.shape[-1]
    if m == n:
        return img
    if m > n:
        raise ValueError(f"cannot Fourier-crop a {n}-pixel box to {m}")
    ft = _crop_ft_axes(rfft2c(img), n, m, (-2,))
    return irfft2c(ft, m) * (m * m) / (n * n)


def fourier_crop_3d(vol: torch.Tensor, m: int) -> torch.Tensor:
    """Downsample real volumes (..., N, N, N) to (..., m, m, m) by cropping their spectrum."""
    n = vol.shape[-1]
    if m == n:
        return vol
    if m > n:
        raise ValueError(f"cannot Fourier-crop a {n}-voxel box to {m}")
    ft = _crop_ft_axes(rfft3c(vol), n, m, (-3, -2))
    return irfft3c(ft, m) * (m ** 3) / (n ** 3)


def fourier_pad_2d(img: torch.Tensor, m: int) -> torch.Tensor:
    """Upsample real images (..., N, N) to (..., m, m) by zero-padding their spectrum."""
    n = img.shape[-1]
    if m == n:
        return img
    ft = rfft2c(img)
    out = torch.zeros(*ft.shape[:-2], m, m // 2 + 1, dtype=ft.dtype, device=ft.device)
    lo = m // 2 - n // 2
    out[..., lo:lo + n, : n // 2 + 1] = ft
    return irfft2c(out, m) * (m * m) / (n * n)


def pad_volume(vol: torch.Tensor, m: int) -> torch.Tensor:
    """Zero-pad a volume (..., N, N, N) in real space to (..., m, m, m), keeping the centre at m//2."""
    n = vol.shape[-1]
    lo = m // 2 - n // 2
    return F.pad(vol, [lo, m - n - lo] * 3)


def pad_images(img: torch.Tensor, m: int) -> torch.Tensor:
    """Zero-pad images (..., N, N) to (..., m, m), keeping the centre at m//2."""
    n = img.shape[-1]
    lo = m // 2 - n // 2
    return F.pad(img, [lo, m - n - lo] * 2)


def crop_center(x: torch.Tensor, n: int, ndim: int) -> torch.Tensor:
    """Crop the central n^ndim block (centre at m//2 → n//2) of the last ndim axes."""
    m = x.shape[-1]
    lo = m // 2 - n // 2
    for d in range(-ndim, 0):
        x = x.narrow(d, lo, n)
    return x


def shift_phase_2d(n: int, shifts: torch.Tensor) -> torch.Tensor:
    """Phase factors (B, n, n//2+1) that translate images by `shifts` (B, 2) = (sx, sy) pixels.

    Multiplying a centred rfft by them gives image(x) → image(x - s) (content moves by +s).
    """
    k = freq_grid_2d(n, shifts.device, shifts.dtype)  # (n, n//2+1, 2) ky, kx
    phase = k[..., 1] * shifts[:, 0, None, None] + k[..., 0] * shifts[:, 1, None, None]
    return torch.polar(torch.ones_like(phase), -2 * math.pi * phase)


def butterworth_lowpass(k: torch.Tensor, cutoff: float, order: float = 1.5) -> torch.Tensor:
    """Butterworth low-pass |H| = 1/sqrt(1+(k/kc)^(2·order)); k and cutoff in the same units."""
    return 1.0 / torch.sqrt(1.0 + (k / cutoff) ** (2 * order))


def butterworth_highpass(k: torch.Tensor, cutoff: float, order: float = 8.0) -> torch.Tensor:
    """Butterworth high-pass, 1 - low-pass in power: |H| = 1/sqrt(1+(kc/k)^(2·order)), 0 at DC."""
    with torch.no_grad():
        safe = torch.where(k > 0, k, torch.ones_like(k))
    h = 1.0 / torch.sqrt(1.0 + (cutoff / safe) ** (2 * order))
    return torch.where(k > 0, h, torch.zeros_like(h))


def lowpass_volume(vol: torch.Tensor, resolution_A: float, apix: float, order: float = 1.5) -> torch.Tensor:
    """Butterworth low-pass a real volume at `resolution_A` Å (half-power point)."""
    n = vol.shape[-1]
    h = butterworth_lowpass(radius_3d(n, vol.device), apix / resolution_A, order)
    return irfft3c(rfft3c(vol) * h, n)


def shell_frequencies(n: int, apix: float = 1.0) -> np.ndarray:
    """Spatial frequency (1/Å) of each FSC shell 0..n//2."""
    return np.arange(n // 2 + 1) / (n * apix)


def fsc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """Fourier shell correlation of two cubic volumes (optionally both multiplied by `mask`).

    Uses torch-fourier-shell-correlation; returns n//2+1 values, shell i at i/(n·apix) 1/Å.
    """
    from torch_fourier_shell_correlation import fourier_shell_correlation
    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.float32)
        a, b = a * mask, b * mask
    return fourier_shell_correlation(a, b).detach().cpu().double().numpy()


def fsc_resolution(curve: np.ndarray, apix: float, threshold: float = 0.143) -> float:
    """Resolution (Å) where the FSC first drops below `threshold`, linearly interpolated.

    Returns the Nyquist resolution (2·apix) if it never drops, and inf if shell 1 is already below.
    """
    curve = np.asarray(curve, dtype=np.float64)
    n = 2 * (len(curve) - 1)
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            if i == 1:
                return float("inf")
            f0, f1 = (i - 1) / (n * apix), i / (n * apix)
            c0, c1 = curve[i - 1], curve[i]
            f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
            return float(1.0 / f)
    return 2.0 * apix
