"""CTF-weighted Fourier backprojection with Wiener-style regularisation, two half maps and their FSC.

For each half set h the spectra Σ CTF·Y and Σ CTF² are inserted into an oversampled (pad·N)³ grid with
torch-fourier-slice (trilinear gridding); images are shifted back by their origin first. The map is
    V_h(k) = Σ CTF·Y / (Σ CTF² + reg_h(|k|)),   reg_h = <Σ CTF²>_shell / SSNR_h(|k|),
with SSNR_h = FSC/(1−FSC) estimated from a first, barely regularised pass (RELION's tau² scheme); the
full map uses both halves and twice the SSNR. A sinc² division in real space undoes the gridding kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch_fourier_slice import insert_central_slices_rfft_3d_multichannel
from torch_fourier_slice.volume_utils import separable_sinc2_correction

from .ctf import CTFParams, compute_ctf
from .fourier import crop_center, fsc, fsc_resolution, irfft3c, pad_images, radius_3d, rfft2c, shift_phase_2d
from .progress import Progress

__all__ = ["BackprojectionAccumulator", "Reconstruction", "finalize_halves", "reconstruct_particles",
           "shell_regulariser"]


class BackprojectionAccumulator:
    """Running sums Σ CTF·Y and Σ CTF² on the oversampled half-spectrum grid of one map."""

    def __init__(self, box: int, apix: float, pad: int = 2, device: torch.device | str = "cpu"):
        self.box, self.apix, self.pad, self.m = box, apix, pad, pad * box
        self.device = torch.device(device)
        m = self.m
        self.num = torch.zeros(m, m, m // 2 + 1, dtype=torch.complex64, device=self.device)
        self.den = torch.zeros(m, m, m // 2 + 1, dtype=torch.float32, device=self.device)
        self.count = 0

    def add(self, images: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor | None,
            ctf: CTFParams | None, phase_flipped: bool = False, weights: torch.Tensor | None = None) -> None:
        """Insert a batch: images (B, N, N), RELION matrices (B, 3, 3), origins (B, 2) px, optional per-image weights."""
        m = self.m
        imgs = images.to(self.device, torch.float32)
        ft = rfft2c(pad_images(imgs, m) if m != self.box else imgs)
        if shifts_px is not None:
            ft = ft * shift_phase_2d(m, shifts_px.to(self.device, torch.float32))  # re-centre: +origin
        if ctf is not None:
            c = compute_ctf(ctf.to(self.device), m, self.apix, phase_flipped)
        else:
            c = torch.ones(1, m, m // 2 + 1, device=self.device).expand(len(imgs), -1, -1)
        w = c * c
        data = ft * c
        if weights is not None:
            wt = weights.to(self.device, torch.float32)[:, None, None]
            data, w = data * wt, w * wt
        stacked = torch.stack([data, w.to(torch.complex64)], 1)  # (B, 2, m, m//2+1)
        R = rotations.to(self.device, torch.float32).transpose(-1, -2)
        dft, _ = insert_central_slices_rfft_3d_multichannel(stacked, (m, m, m), R)
        self.num += dft[0]
        self.den += dft[1].real
        self.count += len(imgs)


@dataclass
class Reconstruction:
    """Full map, half maps (N, N, N) numpy, half-map FSC per shell, resolutions (Å)."""

    full: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray
    apix: float
    res_0143: float
    res_05: float
    counts: tuple[int, int]


def shell_regulariser(fsc_half: torch.Tensor | np.ndarray, weight_mean: torch.Tensor | np.ndarray, *,
                      whole: bool = False, fudge: float = 1.0, fsc_min: float = 1e-3,
                      fsc_max: float = 0.999) -> torch.Tensor:
    """Per-shell Wiener regulariser 1/τ²(k) from the half-map FSC, in the units of the CTF² weights.

    The map of a set of particles is V(k) = Σ CTF·Y / (Σ CTF² + reg(|k|)). With SSNR = FSC/(1−FSC) per shell
    (FSC clamped to [fsc_min, fsc_max]) and w̄ the mean over the shell of the backprojected weights Σ CTF²
    (or Σ CTF²/σ² when images are noise-whitened) of the map being regularised,
        reg = w̄ / (fudge · SSNR)             for a half map (`whole=False`),
        reg = w̄ / (2 · fudge · SSNR)         for the map of both halves (`whole=True`, w̄ of the summed weights),
    i.e. σ²/τ² of RELION's tau² scheme (the full map has twice the half maps' SSNR). `fudge` > 1 regularises
    less (RELION's tau2_fudge). Both inputs are per shell (index = radius in Fourier pixels of the box, up
    to Nyquist); the result is a float32 tensor of the same length on weight_mean's device. docs/reconstruction.md
    explains the choice and its measurements.
    """
    w = torch.as_tensor(weight_mean, dtype=torch.float32)
    c = torch.as_tensor(fsc_half, dtype=torch.float32, device=w.device)
    if c.shape != w.shape:
        raise ValueError(f"FSC ({tuple(c.shape)}) and weight means ({tuple(w.shape)}) need one value per shell")
    if not fudge > 0:
        raise ValueError(f"fudge must be positive, got {fudge}")
    c = torch.nan_to_num(c, nan=fsc_min).clamp(fsc_min, fsc_max)
    ssnr = fudge * c / (1 - c) * (2.0 if whole else 1.0)
    return w.clamp(min=0) / ssnr


def _shell_index(m: int, box: int, device) -> torch.Tensor:
    """For each voxel of the (m, m, m//2+1) grid, its FSC shell at the N-box sampling (−1 beyond Nyquist)."""
    r = radius_3d(m, device) * box  # shell units of the N box
    idx = torch.round(r).long()
    return torch.where(r <= box / 2, idx, torch.full_like(idx, -1))


def _solve(acc_num: torch.Tensor, acc_den: torch.Tensor, reg_shell: torch.Tensor, shells: torch.Tensor,
           box: int) -> torch.Tensor:
    m = acc_num.shape[0]
    reg = torch.where(shells >= 0, reg_shell[shells.clamp(min=0)], torch.zeros_like(acc_den))
    denom = acc_den + reg
    ft = torch.where((shells >= 0) & (denom > 0), acc_num / denom.clamp(min=1e-30), torch.zeros_like(acc_num))
    vol = irfft3c(ft, m) / separable_sinc2_correction((m, m, m), device=ft.device)
    return crop_center(vol, box, 3) if m != box else vol


def _shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    valid = shells >= 0
    s = torch.zeros(n_shells, device=values.device).index_add_(0, shells[valid], values[valid])
    c = torch.zeros(n_shells, device=values.device).index_add_(0, shells[valid], torch.ones_like(values[valid]))
    return s / c.clamp(min=1)


def finalize_halves(a1: BackprojectionAccumulator, a2: BackprojectionAccumulator,
                    mask: torch.Tensor | None = None) -> Reconstruction:
    """Wiener-regularised half maps and full map from two accumulators (see module docstring)."""
    box, m, dev = a1.box, a1.m, a1.device
    shells = _shell_index(m, box, dev)
    n_sh = box // 2 + 1
    den_mean = [_shell_mean(a.den, shells, n_sh) for a in (a1, a2)]
    tiny = [1e-3 * d.mean().clamp(min=1e-12) * torch.ones(n_sh, device=dev) for d in den_mean]
    v1 = _solve(a1.num, a1.den, tiny[0], shells, box)
    v2 = _solve(a2.num, a2.den, tiny[1], shells, box)
    curve = torch.as_tensor(fsc(v1, v2, mask), dtype=torch.float32, device=dev)
    h1 = _solve(a1.num, a1.den, shell_regulariser(curve, den_mean[0]), shells, box)
    h2 = _solve(a2.num, a2.den, shell_regulariser(curve, den_mean[1]), shells, box)
    full = _solve(a1.num + a2.num, a1.den + a2.den, shell_regulariser(curve, den_mean[0] + den_mean[1], whole=True),
                  shells, box)
    final_fsc = fsc(h1, h2, mask)
    return Reconstruction(full.cpu().numpy(), h1.cpu().numpy(), h2.cpu().numpy(), final_fsc, a1.apix,
                          fsc_resolution(final_fsc, a1.apix, 0.143), fsc_resolution(final_fsc, a1.apix, 0.5),
                          (a1.count, a2.count))


def reconstruct_particles(particles, batch_size: int = 256, pad: int = 2, device: str = "cpu",
                          seed: int = 0, mask: np.ndarray | None = None,
                          progress=None) -> Reconstruction:
    """Reconstruct half maps and the full map from an io.ParticleSet, streaming its stacks in batches.

    `progress` is a text stream for the progress lines (default: stdout)."""
    particles.require(poses=True, ctf=False)
    half = particles.half_sets(seed)
    accs = {h: BackprojectionAccumulator(particles.box, particles.apix, pad, device) for h in (1, 2)}
    prog = Progress(len(particles), "reconstruct", stream=progress)
    done = 0
    for s in range(0, len(particles), batch_size):
        rows = np.arange(s, min(len(particles), s + batch_size))
        imgs = torch.from_numpy(particles.images(rows))
        rots = particles.rotations(rows)
        sh = particles.shifts_px(rows)
        ctf = particles.ctf_params(rows) if particles.has_ctf else None
        for h in (1, 2):
            sel = np.nonzero(half[rows] == h)[0]
            if len(sel):
                accs[h].add(imgs[sel], rots[sel], sh[sel], ctf[sel] if ctf is not None else None,
                            particles.phase_flipped)
        done += len(rows)
        prog.step(done)
    if accs[1].count == 0 or accs[2].count == 0:
        raise ValueError("both half sets need particles; check rlnRandomSubset")
    m = torch.as_tensor(mask, dtype=torch.float32, device=device) if mask is not None else None
    return finalize_halves(accs[1], accs[2], m)
