"""CTF-weighted Fourier backprojection with Wiener-style weights, two half maps and their FSC.

For each half set h the sums Σ CTF·Y and Σ CTF² are accumulated on a pad× oversampled (pad·N)³ centred-rfft
grid by :func:`flexplugin.engine.insertion.insert_slices` (trilinear, frequencies up to Nyquist), each
image's own N-pixel spectrum placed at pad× its spacing, after re-centring by +origin (RELION's
backprojector does the same). Per voxel the map is
    V_h(k) = Σ CTF·Y / (Σ CTF² + reg_h(|k|)) · (w̄_h + reg_h) / w̄_h,   reg_h = w̄_h / SSNR_h(|k|),
w̄_h the shell's mean Σ CTF² and SSNR_h = FSC/(1−FSC) of the unregularised half maps (RELION's tau² scheme,
:func:`shell_regulariser`); the full map uses both halves' sums and twice the SSNR. The factor
(w̄ + reg)/w̄ keeps each shell's mean gain at 1: the Wiener term only reweights voxels within a shell (by
their sampling), it does not low-pass the map. Every map is cut to N³ in real space (no gridding
correction) and multiplied by a soft sphere of radius N/2, as relion_reconstruct does. docs/reconstruction.md
gives the measurements behind each of these choices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .ctf import CTFParams, compute_ctf
from .fourier import crop_center, fsc_resolution, irfft3c, radius_3d, rfft2c, rfft3c, shift_phase_2d
from .insertion import insert_slices
from .progress import Progress
from .wiener_config import WienerConfig

__all__ = ["BackprojectionAccumulator", "Reconstruction", "backprojection_terms", "finalize_halves",
           "reconstruct_particles", "shell_fsc", "shell_regulariser", "soft_sphere"]

NYQUIST = 0.5  # inserted frequencies |k| ≤ 0.5 cycles/px of the images (RELION's r_max = N/2)
MASK_EDGE_PX = 3.0  # raised-cosine edge of the spherical mask beyond radius N/2 (RELION's softMaskOutsideMap)


def backprojection_terms(images: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor | None,
                         ctf: CTFParams | None, apix: float, phase_flipped: bool = False,
                         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What one batch inserts: CTF·Y (B, N, N//2+1) complex, CTF² (B, N, N//2+1) and the insertion matrices Aᵀ.

    Y is the centred rfft of each N-pixel image re-centred by +origin (RELION's convention); the spectra are
    not zero-padded: they are placed on the pad× oversampled grid at pad× their spacing (docs/reconstruction.md)."""
    imgs = images.to(device, torch.float32)
    n = imgs.shape[-1]
    ft = rfft2c(imgs)
    if shifts_px is not None:
        ft = ft * shift_phase_2d(n, shifts_px.to(device, torch.float32))  # re-centre: +origin
    if ctf is not None:
        c = compute_ctf(ctf.to(device), n, apix, phase_flipped)
    else:
        c = torch.ones(len(imgs), n, n // 2 + 1, device=device)
    return ft * c, c * c, rotations.to(device, torch.float32).transpose(-1, -2)


class BackprojectionAccumulator:
    """Running sums Σ CTF·Y and Σ CTF² on the oversampled (pad·N)³ half-spectrum grid of one map."""

    def __init__(self, box: int, apix: float, pad: int = WienerConfig.pad, device: torch.device | str = "cpu"):
        self.box, self.apix, self.pad, self.m = box, apix, pad, pad * box
        self.device = torch.device(device)
        m = self.m
        self.num = torch.zeros(m, m, m // 2 + 1, dtype=torch.complex64, device=self.device)
        self.den = torch.zeros(m, m, m // 2 + 1, dtype=torch.float32, device=self.device)
        self.count = 0

    def add(self, images: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor | None,
            ctf: CTFParams | None, phase_flipped: bool = False, weights: torch.Tensor | None = None) -> None:
        """Insert a batch: images (B, N, N), RELION matrices (B, 3, 3), origins (B, 2) px, optional per-image weights."""
        data, w, R = backprojection_terms(images, rotations, shifts_px, ctf, self.apix, phase_flipped, self.device)
        if weights is not None:
            wt = weights.to(self.device, torch.float32)[:, None, None]
            data, w = data * wt, w * wt
        insert_slices(w[:, None], data[:, None], R, self.m, NYQUIST, out_real=self.den[None],
                      out_cplx=self.num[None])
        self.count += len(images)

    def all_reduce_(self) -> BackprojectionAccumulator:
        """Under torch.distributed: add the sums and counts of every rank's particles (a no-op in one process)."""
        if distributed.world() > 1:
            distributed.all_reduce_(self.num)
            distributed.all_reduce_(self.den)
            self.count = int(distributed.all_reduce_(torch.tensor([self.count], dtype=torch.float64)).item())
        return self


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

    def filtered(self) -> np.ndarray:
        """The full map low-passed per shell by the full map's FSC estimated from the halves, 2F/(1+F) (F the
        half-map FSC clamped to [0, 1]) — the Wiener filter's shell gain, which `full` leaves out
        (docs/reconstruction.md). Use it where a denoised map is wanted, e.g. as a reference."""
        n = self.full.shape[-1]
        f = np.clip(np.nan_to_num(np.asarray(self.fsc, dtype=np.float64)), 0.0, 1.0)
        gain = torch.as_tensor(2 * f / (1 + f), dtype=torch.float32)
        shells = torch.round(radius_3d(n) * n).long()
        g = torch.where(shells <= n // 2, gain[shells.clamp(max=n // 2)], torch.zeros(()))
        return irfft3c(rfft3c(torch.from_numpy(self.full).float()) * g, n).numpy()


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
    """For each voxel of the (m, m, m//2+1) grid, its shell round(|k|·N) at the N-box sampling, −1 beyond
    Nyquist (|k|·N > N/2, where relion_reconstruct also zeroes the map)."""
    r = radius_3d(m, device) * box  # shell units of the N box
    idx = torch.round(r).long()
    return torch.where(r <= box / 2, idx, torch.full_like(idx, -1))


def soft_sphere(box: int, radius: float | None = None, edge: float = MASK_EDGE_PX, device=None) -> torch.Tensor:
    """(N, N, N) mask: 1 inside `radius` (default N/2) px of the centre, raised-cosine to 0 over `edge` px.

    Every map and half map is multiplied by it, as relion_reconstruct does: the box corners hold only noise."""
    g = torch.arange(box, device=device, dtype=torch.float32) - box // 2
    r = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2).sqrt()
    rad = box / 2 if radius is None else radius
    ramp = 0.5 + 0.5 * torch.cos(torch.pi * (r - rad) / edge)
    return torch.where(r <= rad, torch.ones_like(r), torch.where(r >= rad + edge, torch.zeros_like(r), ramp))


def _solve(acc_num: torch.Tensor, acc_den: torch.Tensor, reg_shell: torch.Tensor | None, den_mean: torch.Tensor,
           shells: torch.Tensor, box: int, sphere: torch.Tensor) -> torch.Tensor:
    """Map of one accumulator: V = Σ CTF·Y / (Σ CTF² + reg) · (w̄ + reg) / w̄ per voxel, on the padded grid.

    The factor (w̄ + reg)/w̄ (w̄ the shell's mean weight) gives each shell unit mean gain, so only the
    Wiener weighting *within* a shell remains; reg None → the plain ratio. No gridding correction: the
    ratio of two trilinear sums is already normalised (dividing by sinc² amplifies the box edges' noise)."""
    m = acc_num.shape[0]
    inside = shells >= 0
    idx = shells.clamp(min=0)
    wbar = torch.where(inside, den_mean[idx], torch.ones_like(acc_den))
    if reg_shell is None:
        reg = 1e-3 * wbar  # keeps voxels that only a corner of one sample reached finite
        gain = torch.ones_like(acc_den)
    else:
        reg = torch.where(inside, reg_shell[idx], torch.zeros_like(acc_den))
        gain = (wbar + reg) / wbar.clamp(min=1e-30)
    denom = acc_den + reg
    ft = torch.where(inside & (denom > 0), acc_num * (gain / denom.clamp(min=1e-30)), torch.zeros_like(acc_num))
    vol = irfft3c(ft, m)
    return (crop_center(vol, box, 3) if m != box else vol) * sphere


def shell_fsc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """FSC of two (N, N, N) maps (optionally both times `mask`) in shells round(|k|·N) = 0..N/2, as RELION bins.

    Hard shells, so that a per-shell factor (the Wiener gain) cannot leak into a neighbour's value, and
    ~40× cheaper than fourier.fsc (soft, interpolated bins) at N = 64; the two differ by ≤ 0.01 per shell."""
    n = a.shape[-1]
    if mask is not None:
        a, b = a * mask, b * mask
    fa, fb = torch.fft.rfftn(a.float()), torch.fft.rfftn(b.float())
    r = torch.fft.ifftshift(torch.round(radius_3d(n, a.device) * n).long(), dim=(0, 1))
    mult = torch.full(fa.shape, 2.0, device=a.device)
    mult[..., 0] = 1.0
    if n % 2 == 0:
        mult[..., -1] = 1.0
    keep = r <= n // 2
    idx, w = r[keep], mult[keep]

    def total(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n // 2 + 1, dtype=torch.float64, device=a.device).index_add_(0, idx, (x[keep] * w).double())

    num = total((fa * fb.conj()).real)
    den = (total(fa.abs().square()) * total(fb.abs().square())).sqrt()
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num)).cpu().numpy()


def _shell_mean(values: torch.Tensor, shells: torch.Tensor, n_shells: int) -> torch.Tensor:
    valid = shells >= 0
    s = torch.zeros(n_shells, device=values.device).index_add_(0, shells[valid], values[valid])
    c = torch.zeros(n_shells, device=values.device).index_add_(0, shells[valid], torch.ones_like(values[valid]))
    return s / c.clamp(min=1)


def finalize_halves(a1: BackprojectionAccumulator, a2: BackprojectionAccumulator,
                    mask: torch.Tensor | None = None) -> Reconstruction:
    """Half maps and full map from two accumulators (see module docstring); `mask` only enters the FSC."""
    box, m, dev = a1.box, a1.m, a1.device
    shells = _shell_index(m, box, dev)
    n_sh = box // 2 + 1
    sphere = soft_sphere(box, device=dev)
    dm1, dm2 = (_shell_mean(a.den, shells, n_sh) for a in (a1, a2))
    u1 = _solve(a1.num, a1.den, None, dm1, shells, box, sphere)
    u2 = _solve(a2.num, a2.den, None, dm2, shells, box, sphere)
    curve = torch.as_tensor(shell_fsc(u1, u2, mask), dtype=torch.float32, device=dev)
    h1 = _solve(a1.num, a1.den, shell_regulariser(curve, dm1), dm1, shells, box, sphere)
    h2 = _solve(a2.num, a2.den, shell_regulariser(curve, dm2), dm2, shells, box, sphere)
    full = _solve(a1.num + a2.num, a1.den + a2.den, shell_regulariser(curve, dm1 + dm2, whole=True), dm1 + dm2,
                  shells, box, sphere)
    final_fsc = shell_fsc(h1, h2, mask)
    return Reconstruction(full.cpu().numpy(), h1.cpu().numpy(), h2.cpu().numpy(), final_fsc, a1.apix,
                          fsc_resolution(final_fsc, a1.apix, 0.143), fsc_resolution(final_fsc, a1.apix, 0.5),
                          (a1.count, a2.count))


def _quiet(_line: str) -> None:
    """The progress stream of ranks other than 0."""


def reconstruct_particles(particles, batch_size: int = WienerConfig.batch_size, pad: int = WienerConfig.pad,
                          device: str = "cpu", seed: int = WienerConfig.seed, mask: np.ndarray | None = None,
                          progress=None) -> Reconstruction:
    """Reconstruct half maps and the full map from an io.ParticleSet, streaming its stacks in batches.

    `progress` is a text stream for the progress lines (default: stdout). Under torch.distributed each rank
    reads and inserts its share of every batch (engine/distributed.py), the accumulators are summed over the
    ranks, and every rank returns the maps one process would (rank 0 alone prints the global progress)."""
    particles.require(poses=True, ctf=False)
    half = particles.half_sets(seed)
    accs = {h: BackprojectionAccumulator(particles.box, particles.apix, pad, device) for h in (1, 2)}
    prog = Progress(len(particles), "reconstruct", stream=progress if distributed.is_main() else _quiet)
    done = 0
    for s in range(0, len(particles), batch_size):
        rows = distributed.shard(np.arange(s, min(len(particles), s + batch_size)))
        done = min(len(particles), s + batch_size)
        if not len(rows):  # more ranks than images in a last small batch
            prog.step(done)
            continue
        imgs = torch.from_numpy(particles.images(rows))
        rots = particles.rotations(rows)
        sh = particles.shifts_px(rows)
        ctf = particles.ctf_params(rows) if particles.has_ctf else None
        for h in (1, 2):
            sel = np.nonzero(half[rows] == h)[0]
            if len(sel):
                accs[h].add(imgs[sel], rots[sel], sh[sel], ctf[sel] if ctf is not None else None,
                            particles.phase_flipped)
        prog.step(done)
    for h in (1, 2):
        accs[h].all_reduce_()
    if accs[1].count == 0 or accs[2].count == 0:
        raise ValueError("both half sets need particles; check rlnRandomSubset")
    m = torch.as_tensor(mask, dtype=torch.float32, device=device) if mask is not None else None
    return finalize_halves(accs[1], accs[2], m)
