"""3D Flex high-resolution reconstruction: the canonical map with the learned motion undone, by latent bins.

Latents and the flow generator are frozen. Particle i's image is modelled as the CTF-weighted central slice
of the deformed map D_{u_i} V (backward warp W(x) = V(x + u(x)), model.py). With the Fourier-slice theorem
and the same diagonal approximation of the normal operator that the Wiener map makes (engine/reconstruct.py:
Σ_i slice_iᵀ CTF_i² slice_i ≈ the inserted CTF² weights), the least-squares data term of a group of
particles that share one deformation D_g reduces to two Fourier accumulators on the 2c grid,
    b_g = Σ_{i∈g} insert(CTF_i·Y_i),   K_g = Σ_{i∈g} insert(CTF_i²),
    f_g(V) = ½ Σ_k K_g(k)|X_g(k)|² − Re Σ_k b̄_g(k) X_g(k),   X_g = F[D_g V],
with V on the padded (2c)³ box and k inside the c box's Nyquist sphere. Particles are grouped into G latent
bins (binning.py) whose deformations differ from their members' by less than a fraction of a voxel; the
accumulators are filled once, O(N·D²), and every evaluation then costs G warps (on the mesh's voxels only) and
G FFTs of the padded box, O(G·D³), whatever N is.

The regulariser is the Wiener map's: ½ Σ_k τ(|k|)|X₀(k)|², τ = engine/reconstruct.shell_regulariser of the
FSC of barely regularised half maps, so that with D = I the minimiser is the Wiener map (before its
per-shell gain γ = (w̄ + τ)/w̄, applied to the solution as the Wiener map applies it) and nothing is fitted
past where the halves stop agreeing. The quadratic is solved by conjugate gradients preconditioned with the inverse Wiener
denominator 1/(ΣK + τ) applied in Fourier space (the exact inverse when D = I), started from the half's Wiener
map, and stopped when the preconditioned residual falls below `tol` of the right-hand side's (or after
`iterations`). Maps are returned as the Wiener map is: the central c³ box times its soft sphere. The
"noflex" maps solve the same problem with D = I.

Before the binning, the particles' mean deformation is taken out of the flows (the frame) and each mesh vertex's
displacements are shrunk by their significance over the trained flows' noise (binning.significance_shrinkage,
ReconstructConfig.flow_noise; docs/algorithms.md, 2.4), so that noise where nothing moves neither misaligns nor
blurs the flex map.

`labels` may be given to choose the bins; one bin per particle (labels = 0..N−1) is the exact per-particle
operator, the reference the binned map converges to as G grows (tests). See docs/flex_reconstruction.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..errors import InputError
from ..fourier import crop_center, fsc_resolution, radius_3d
from ..insertion import insert_slices
from ..io import ParticleSet
from ..progress import Progress
from ..reconstruct import (
    NYQUIST,
    backprojection_terms,
    shell_fsc,
    shell_regulariser,
    soft_sphere,
)
from .binning import LatentBins, bins_from_labels, choose_bins, significance_shrinkage, vertex_displacements
from .generate import FlexModel
from .reconstruct_config import BATCH_SIZE, FLOW_NOISE, FLOW_TOL, ITERATIONS, MAX_BINS, TOL

_ssnr_fsc = shell_fsc  # the FSC the Wiener map takes its SSNR from (hard shells)

__all__ = ["BinnedHalf", "HighresResult", "Sphere", "check_options", "flex_reconstruct", "pcg"]


@dataclass
class HighresResult:
    flex_half1: np.ndarray
    flex_half2: np.ndarray
    noflex_half1: np.ndarray
    noflex_half2: np.ndarray
    fsc_flex: np.ndarray
    fsc_noflex: np.ndarray
    apix: float
    res_flex: float
    res_noflex: float
    objective: dict
    start_half1: np.ndarray | None = None
    start_half2: np.ndarray | None = None
    bins: int = 0
    flow_spread: float = 0.0
    iterations: dict = field(default_factory=dict)
    frame_shift_vox: float = 0.0  # largest vertex displacement of the particles' mean deformation (taken out)
    vertices_still: float = 0.0  # fraction of the mesh vertices whose motion lies within the flow noise (held still)
    half_counts: tuple[int, int] = (0, 0)  # particles inserted into each half set (over all ranks)

    @property
    def flex_map(self) -> np.ndarray:
        return 0.5 * (self.flex_half1 + self.flex_half2)

    @property
    def noflex_map(self) -> np.ndarray:
        return 0.5 * (self.noflex_half1 + self.noflex_half2)


@dataclass
class Sphere:
    """Voxels of the centred rfft of the 2c-padded box that lie within the c box's Nyquist sphere.

    The unknown map lives on the padded (2c)³ box, like the Wiener map before its final crop, so that the
    Wiener map is exactly the D = I minimiser; the central c³ box, times the Wiener map's soft sphere, is
    returned."""

    c: int
    index: torch.Tensor  # (P,) flat index into the centred (M, M, M//2+1) rfft (the accumulators' layout)
    shell: torch.Tensor  # (P,) FSC shell of the c box, 0..c//2
    mult: torch.Tensor  # (P,) 1 on the kx = 0 and kx = M/2 planes, else 2 (a stored coefficient and its mate)
    mask: torch.Tensor  # (c, c, c) the soft sphere every Wiener map is multiplied by
    index_u: torch.Tensor  # (P,) the same points in torch's unshifted rfftn layout
    sign: torch.Tensor  # (P,) (−1)^(kx+ky+kz): the centring of the real-space box as a phase

    @property
    def m(self) -> int:
        return 2 * self.c

    @staticmethod
    def make(c: int, device) -> Sphere:
        """The sphere of box c on the 2c grid (the Wiener map's shells: round(|k|·c), |k|·c ≤ c/2)."""
        m = 2 * c
        r = radius_3d(m, device) * c
        keep = (r <= c / 2).reshape(-1)
        idx = torch.nonzero(keep).squeeze(1)
        shell = torch.round(r.reshape(-1)[idx]).long()
        kx = torch.arange(m // 2 + 1, device=device)
        edge = ((kx == 0) | (kx == m // 2)).expand(m, m, -1).reshape(-1)[idx]  # self-conjugate columns
        mult = torch.where(edge, 1.0, 2.0)
        # centred rfft (fourier.rfft3c) = fftshift over z, y of rfftn(ifftshift(vol)); the ifftshift of an even box
        # is the phase (−1)^(kx+ky+kz), so the sphere can be read from a plain rfftn, without the two rolls
        w = m // 2 + 1
        iz, iy, ix = idx // (m * w), (idx // w) % m, idx % w
        uz, uy = (iz + m // 2) % m, (iy + m // 2) % m
        index_u = (uz * m + uy) * w + ix
        sign = 1.0 - 2.0 * ((iz - m // 2 + iy - m // 2 + ix) % 2).float()
        # the points in the order of the rfftn's memory, so that gathering and scattering them read memory in order
        o = torch.argsort(index_u)
        return Sphere(c, idx[o], shell[o], mult[o], soft_sphere(c, device=device), index_u[o], sign[o])

    def spectrum(self, vol: torch.Tensor) -> torch.Tensor:
        """X = F[vol] at the sphere (the centred rfft, fourier.rfft3c): (..., M, M, M) → (..., P)."""
        ft = torch.fft.rfftn(vol, dim=(-3, -2, -1))
        return ft.reshape(*ft.shape[:-3], -1)[..., self.index_u] * self.sign

    def volume(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Inverse of :meth:`spectrum` (times `scale`) for a spectrum held on the sphere: (..., P) → (..., M, M, M)."""
        m = self.m
        full = torch.zeros(*x.shape[:-1], m * m * (m // 2 + 1), dtype=torch.complex64, device=x.device)
        full[..., self.index_u] = x * (self.sign * scale)
        return torch.fft.irfftn(full.view(*x.shape[:-1], m, m, m // 2 + 1), s=(m, m, m), dim=(-3, -2, -1))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Aᵀy for A = :meth:`spectrum` and the inner product Re Σ mult·ȳ·x of the half spectrum (the full
        spectrum's): M³ times :meth:`volume`, for y with the Friedel symmetry of real maps on the kx = 0 plane."""
        return self.volume(y, float(self.m ** 3))

    def crop(self, vol: torch.Tensor) -> torch.Tensor:
        """The map as the Wiener map is written: central c³ box times the soft sphere."""
        return crop_center(vol, self.c, 3) * self.mask

    def shell_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of values (P,) per shell (c//2 + 1,)."""
        n = self.c // 2 + 1
        s = torch.zeros(n, device=values.device).index_add_(0, self.shell, values)
        k = torch.zeros(n, device=values.device).index_add_(0, self.shell, torch.ones_like(values))
        return s / k.clamp(min=1)


class BinnedHalf:
    """The binned least-squares problem of one half set: Fourier accumulators per bin and the bins' flows."""

    def __init__(self, sphere: Sphere, n_bins: int, device: torch.device):
        self.sp, self.dev = sphere, device
        p = sphere.index.numel()
        self.num = torch.zeros(n_bins, p, dtype=torch.complex64, device=device)
        self.den = torch.zeros(n_bins, p, dtype=torch.float32, device=device)
        self.counts = np.zeros(n_bins, dtype=np.int64)
        self.grid: torch.Tensor | None = None  # (G, nvox, 3) grid_sample coordinates of the support voxels
        self.vox: torch.Tensor | None = None  # (nvox,) flat voxel index of the support
        self.reg = torch.zeros(p, device=device)  # τ per sphere voxel
        self.gain = torch.ones(p, device=device)  # the Wiener map's unit shell gain (w̄ + τ)/w̄, applied at the end
        self._win: tuple[tuple[int, int, int], tuple[int, int, int], torch.Tensor] | None = None  # _window's cache
        self._win_key: tuple[int, int] | None = None
        self._open: int | None = None  # the bin being inserted (insert, flush)
        self._open_den: torch.Tensor | None = None
        self._open_num: torch.Tensor | None = None
        self._sum_den: torch.Tensor | None = None  # Σ_g K_g and Σ_g b_g, kept by freeze
        self._sum_num: torch.Tensor | None = None

    # ---- accumulation, once ----
    def insert(self, images: torch.Tensor, rotations: torch.Tensor, shifts_px: torch.Tensor, ctf, phase_flipped: bool,
               apix: float, labels: np.ndarray) -> None:
        """Insert a batch of images (B, c, c) into the accumulators of their bins (labels (B,)), as the Wiener map
        inserts them (engine/reconstruct.backprojection_terms, the image's own spectrum on the 2c grid)."""
        m = self.sp.m
        data, w, R = backprojection_terms(images, rotations, shifts_px, ctf, apix, phase_flipped, self.dev)
        self._sum_den = self._sum_num = None
        if self._open_den is None:  # one bin's sums on the whole grid, added to its accumulator when the bin changes
            w_ = m // 2 + 1
            self._open_den = torch.zeros(1, m, m, w_, device=self.dev)
            self._open_num = torch.zeros(1, m, m, w_, dtype=torch.complex64, device=self.dev)
        for g in np.unique(labels):
            if g != self._open:
                self.flush()
                self._open = int(g)
            sel = torch.as_tensor(np.nonzero(labels == g)[0], device=self.dev)
            insert_slices(w[sel][:, None], data[sel][:, None], R[sel], m, NYQUIST, out_real=self._open_den,
                          out_cplx=self._open_num)
            self.counts[g] += len(sel)

    def flush(self) -> None:
        """Add the open bin's grid sums to its accumulators. Insertion in bin order (flex_reconstruct sorts the
        particles by bin) thus reads each bin's grid once instead of once per batch."""
        if self._open is not None and self._open_den is not None and self._open_num is not None:
            g, idx = self._open, self.sp.index
            self.den[g] += self._open_den.view(-1)[idx]
            self.num[g] += self._open_num.view(-1)[idx]
            self._open_den.zero_()
            self._open_num.zero_()
        self._open = None

    def freeze(self) -> None:
        """Flush, and keep the sums over the bins (the Wiener numerator and denominator) for the solve."""
        self.flush()
        self._open_den = self._open_num = None  # the insertion's grid, not needed by the solve
        self._sum_den, self._sum_num = self.den.sum(0), self.num.sum(0)

    def set_flows(self, model: FlexModel, displacements: torch.Tensor) -> None:
        """Each bin's flow at the box c from its mean vertex displacements (G, V, 3) Å."""
        c, m = self.sp.c, self.sp.m
        raster = model.raster(c)
        u = raster.flow_vox(displacements.to(model.device), model.apix_at(c)).to(self.dev)  # (G, nvox, 3)
        vox = raster.vox.to(self.dev)
        lo = m // 2 - c // 2  # the c box sits at the centre of the padded box
        z, y, x = vox // (c * c) + lo, (vox // c) % c + lo, vox % c + lo
        self.vox = (z * m + y) * m + x
        pos = raster.pos.to(self.dev)
        self.grid = (pos[None] + u + m // 2) * (2.0 / (m - 1)) - 1.0

    # ---- the operator ----
    # D_g = P + S_g: P keeps the voxels off the mesh's support (vox), S_g samples V at x + u_g(x) onto the support.
    # By linearity Σ_g D_gᵀ Aᵀ z_g = P Aᵀ(Σ_g z_g) + Σ_g S_gᵀ (Aᵀ z_g)[vox]: one inverse FFT of the padded box for
    # all bins, and per bin an inverse FFT computed only on the support's bounding box (the passes along y and x
    # only where it lies). The centring phase of A cancels in Aᵀ K A, so the bins' spectra are read from a plain
    # rfftn. Same operator as one warp, FFT pair and adjoint warp per bin; float rounding differs.
    def warp(self, V: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """D_g V for bins g (B,): V resampled at x + u_g(x) on the mesh's voxels, unchanged elsewhere."""
        m = self.sp.m
        b = len(g)
        if self.grid is None:
            return V[None].expand(b, -1, -1, -1)
        W = V.reshape(1, -1).repeat(b, 1)
        W[:, self.vox] = self._sample(V, g)
        return W.view(b, m, m, m)

    def _sample(self, V: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """S_g V: V (M, M, M) trilinearly sampled at the support voxels' x + u_g(x), (B, nvox)."""
        assert self.grid is not None
        grid = self.grid[g]
        return F.grid_sample(V[None, None], grid.view(1, len(g), -1, 1, 3), mode="bilinear", padding_mode="zeros",
                             align_corners=True).view(len(g), -1)

    def _window(self) -> tuple[tuple[int, int, int], tuple[int, int, int], torch.Tensor]:
        """The support's bounding box (start and size, zyx) on the padded box and the support's flat index in it."""
        assert self.vox is not None
        key = (self.vox.data_ptr(), self.vox.numel())
        if self._win is None or self._win_key != key:
            m = self.sp.m
            zyx = torch.stack([self.vox // (m * m), (self.vox // m) % m, self.vox % m])
            lo, hi = zyx.amin(1), zyx.amax(1) + 1
            size = hi - lo
            loc = ((zyx[0] - lo[0]) * size[1] + zyx[1] - lo[1]) * size[2] + zyx[2] - lo[2]
            a, n = [int(v) for v in lo], [int(v) for v in size]
            self._win = ((a[0], a[1], a[2]), (n[0], n[1], n[2]), loc)
            self._win_key = key
        return self._win

    def _scatter(self, z: torch.Tensor) -> torch.Tensor:
        """Sphere values (B, P) into torch's rfftn layout (B, M, M, M//2+1), zero elsewhere."""
        m = self.sp.m
        full = torch.zeros(z.shape[0], m * m * (m // 2 + 1), dtype=torch.complex64, device=z.device)
        full[:, self.sp.index_u] = z
        return full.view(-1, m, m, m // 2 + 1)

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Unnormalised inverse rfftn of sphere values z (P,) on the whole padded box (M, M, M)."""
        m = self.sp.m
        return torch.fft.irfftn(self._scatter(z[None])[0], s=(m, m, m), norm="forward")

    def _inverse_at_support(self, z: torch.Tensor) -> torch.Tensor:
        """(Unnormalised inverse rfftn of sphere values z (B, P))[vox], (B, nvox): each 1D pass only where needed."""
        m = self.sp.m
        (z0, y0, x0), (nz, ny, nx), loc = self._window()
        a = torch.fft.ifft(self._scatter(z), dim=1, norm="forward")[:, z0:z0 + nz]
        a = torch.fft.ifft(a, dim=2, norm="forward")[:, :, y0:y0 + ny]
        a = torch.fft.irfft(a, n=m, dim=3, norm="forward")[..., x0:x0 + nx]
        return a.reshape(len(z), -1)[:, loc]

    def _chunks(self, chunk: int | None):
        if chunk is None:
            # bins per batched FFT: on a CPU one volume per thread keeps the (2c)³ volumes in cache (measured at
            # c = 64, 1 thread: 1 bin at a time 2x faster than 8); a GPU wants bigger batches
            chunk = 8 if self.dev.type != "cpu" else min(8, max(1, torch.get_num_threads()))
        live = np.nonzero(self.counts > 0)[0]
        for s in range(0, len(live), chunk):
            yield torch.as_tensor(live[s:s + chunk], device=self.dev)

    def _apply(self, V: torch.Tensor | None, zs, chunk: int | None) -> torch.Tensor:
        """Σ_g D_gᵀ Aᵀ z_g over the live bins, z_g = zs(g, X_g) with X_g = F[D_g V] read at the sphere without the
        centring phase (V None: zs(g, None))."""
        m, sp = self.sp.m, self.sp
        self.flush()
        total = torch.zeros(sp.index_u.numel(), dtype=torch.complex64, device=self.dev)
        if self.grid is None:  # D = I for every bin
            X = None if V is None else torch.fft.rfftn(V).reshape(-1)[sp.index_u]
            for g in self._chunks(chunk):
                total += zs(g, None if X is None else X[None].expand(len(g), -1)).sum(0)
            return self._inverse(total)
        assert self.vox is not None
        Vg = (torch.zeros(m, m, m, device=self.dev) if V is None else V.detach()).requires_grad_(True)
        s_all = self._sample(Vg, torch.as_tensor(np.nonzero(self.counts > 0)[0], device=self.dev))
        y_all = torch.zeros_like(s_all)
        done = 0
        for g in self._chunks(chunk):
            b = len(g)
            X = None
            if V is not None:
                W = V.reshape(1, -1).repeat(b, 1)
                W[:, self.vox] = s_all[done:done + b].detach()
                X = torch.fft.rfftn(W.view(b, m, m, m), dim=(-3, -2, -1)).reshape(b, -1)[:, sp.index_u]
            z = zs(g, X)
            total += z.sum(0)
            y_all[done:done + b] = self._inverse_at_support(z)
            done += b
        out = self._inverse(total)
        out.view(-1)[self.vox] = 0.0  # P: the support's voxels come from the bins' samples only
        return out + torch.autograd.grad(s_all, Vg, grad_outputs=y_all)[0]  # Σ_g S_gᵀ (Aᵀ z_g)[vox]

    def rhs(self, V_like: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Right-hand side Σ_g D_gᵀ Aᵀ b_g (A: the sphere spectrum)."""
        sign = self.sp.sign
        return self._apply(None, lambda g, X: self.num[g] * sign, chunk)

    def hess(self, p: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """H p = Σ_g D_gᵀ Aᵀ K_g A D_g p + Aᵀ τ A p: per bin one warp, one FFT, one inverse FFT, one adjoint warp."""
        out = self._apply(p, lambda g, X: self.den[g] * X, chunk)
        return out + self._inverse(self.reg * torch.fft.rfftn(p).reshape(-1)[self.sp.index_u])

    def total_den(self) -> torch.Tensor:
        """Σ_g K_g (kept by :meth:`freeze`)."""
        self.flush()
        return self._sum_den if self._sum_den is not None else self.den.sum(0)

    def total_num(self) -> torch.Tensor:
        """Σ_g b_g (kept by :meth:`freeze`)."""
        self.flush()
        return self._sum_num if self._sum_num is not None else self.num.sum(0)

    def precondition(self, r: torch.Tensor) -> torch.Tensor:
        """z = F⁻¹[(F r) / (ΣK + τ)]: the inverse Wiener denominator in Fourier space (SPD)."""
        sp = self.sp
        X = sp.spectrum(r)
        return sp.volume(X / (self.total_den() + self.reg).clamp(min=1e-30))

    def wiener(self, reg: torch.Tensor) -> torch.Tensor:
        """Σb / (ΣK + τ) on the padded box: with :meth:`finish`, the half's Wiener map (engine/reconstruct.py)."""
        return self.sp.volume(self.total_num() / (self.total_den() + reg).clamp(min=1e-30))

    def finish(self, V: torch.Tensor) -> np.ndarray:
        """The map as the Wiener map is written: each shell times its gain (w̄ + τ)/w̄, cut to c³, soft sphere.

        The gain is a per-shell factor, so it leaves every FSC as it is; it is applied after the solve because a
        warp mixes shells, and gains of up to 1/SSNR inside the solve would carry noise into resolved shells."""
        return self.sp.crop(self.sp.volume(self.gain * self.sp.spectrum(V))).cpu().numpy()


def pcg(hess, rhs: torch.Tensor, x0: torch.Tensor, precond, iterations: int, tol: float,
        report=None) -> tuple[torch.Tensor, list[float], str]:
    """Preconditioned conjugate gradients for H x = rhs from x0. Stops when the preconditioned residual
    √(rᵀM r / rhsᵀM rhs) ≤ tol, or after `iterations`. Returns x, the objective ½xᵀHx − rhsᵀx per
    iteration (from x0), and why it stopped."""
    x = x0.clone()
    r = rhs - hess(x)
    z = precond(r)
    p = z.clone()
    rz = float((r * z).sum())
    b_norm = float((rhs * precond(rhs)).sum())
    hist = [-0.5 * float((x * (rhs + r)).sum())]
    why = f"iteration limit {iterations}"
    rel = math.sqrt(max(rz, 0.0) / max(b_norm, 1e-300))
    if rel <= tol:
        return x, hist, f"converged at start (residual {rel:.2e})"
    for it in range(1, iterations + 1):
        q = hess(p)
        pq = float((p * q).sum())
        if pq <= 0:
            why = f"stopped at iteration {it}: curvature {pq:.3g} not positive"
            break
        alpha = rz / pq
        x += alpha * p
        r -= alpha * q
        z = precond(r)
        rz_new = float((r * z).sum())
        hist.append(-0.5 * float((x * (rhs + r)).sum()))
        rel = math.sqrt(max(rz_new, 0.0) / max(b_norm, 1e-300))
        if report is not None:
            report(it, hist[-1], rel)
        if rel <= tol:
            why = f"converged at iteration {it} (residual {rel:.2e} ≤ {tol:g})"
            break
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, hist, why


def check_options(iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE, reg_scale: float = 1.0,
                  tol: float = TOL, bins: int | None = None, flow_tol: float = FLOW_TOL,
                  max_bins: int = MAX_BINS, flow_noise: float = FLOW_NOISE) -> None:
    """Raise InputError naming the option for values the solver cannot use (called before any heavy work)."""
    checks = [(iterations >= 1, f"--iterations must be >= 1, got {iterations}"),
              (batch_size >= 1, f"--batch-size must be >= 1, got {batch_size}"),
              (math.isfinite(reg_scale) and reg_scale > 0, f"--reg must be a number > 0, got {reg_scale}"),
              (math.isfinite(tol) and 0 < tol < 1, f"--tol must be in (0, 1), got {tol}"),
              (bins is None or bins >= 1, f"--bins must be >= 1, got {bins}"),
              (math.isfinite(flow_tol) and flow_tol > 0, f"--flow-tol must be a number > 0 (voxels), got {flow_tol}"),
              (max_bins >= 1, f"--max-bins must be >= 1, got {max_bins}"),
              (math.isfinite(flow_noise) and flow_noise >= 0,
               f"--flow-noise must be a number >= 0 (voxels of the training box), got {flow_noise}")]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)


def _check_inputs(model: FlexModel, ps: ParticleSet, half: np.ndarray) -> None:
    if ps.box != model.box or abs(ps.apix - model.apix) > 1e-3 * model.apix:
        raise InputError(f"particles ({ps.box} px, {ps.apix:.4f} Å) differ from the training input "
                         f"({model.box} px, {model.apix:.4f} Å)")
    n1, n2 = int((half == 1).sum()), int((half == 2).sum())
    if n1 == 0 or n2 == 0:
        raise InputError(f"{ps.star_path or 'particles'}: both half sets need particles (half 1 has {n1}, half 2 "
                         f"has {n2}); give at least 2 particles, and rlnRandomSubset values 1 and 2 if present")


def _model_rows(model: FlexModel, ps: ParticleSet) -> np.ndarray:
    index = {int(i): r for r, i in enumerate(model.ids)}
    ids = ps.ids
    missing = [int(i) for i in ids if int(i) not in index]
    if missing:
        raise InputError(f"{len(missing)} particles (e.g. id {missing[0]}) have no latent in the model; "
                         "reconstruct with the particles the model was trained on (or a subset)")
    return np.array([index[int(i)] for i in ids], dtype=np.int64)


def _quiet(line: str) -> None:
    """A progress sink that prints nothing (the ranks other than 0 under torchrun)."""


def flex_reconstruct(model: FlexModel, ps: ParticleSet, iterations: int = ITERATIONS, batch_size: int = BATCH_SIZE,
                     reg_scale: float = 1.0, tol: float = TOL, do_noflex: bool = True,
                     mask: np.ndarray | None = None, seed: int = 0, bins: int | None = None,
                     flow_tol: float = FLOW_TOL, max_bins: int = MAX_BINS, labels: np.ndarray | None = None,
                     flow_noise: float = FLOW_NOISE, device: torch.device | str = "cpu",
                     progress=None) -> HighresResult | None:
    """Flex and noflex half maps at the crop box by latent-binned, preconditioned CG (see module docstring).

    Under torchrun (engine/distributed.py) every rank inserts its share of the particles, the accumulators are
    summed over the ranks, and rank 0 alone solves and returns the result; the other ranks return None.

    `bins` fixes G; otherwise G is the smallest power of two (≤ `max_bins`) whose flow spread (95 % of the
    particles) is ≤ `flow_tol` voxels. `labels` (N,) overrides the binning (0..G−1); `reg_scale` scales the
    FSC-derived regulariser (1: the Wiener map's). Each mesh vertex's motion is shrunk by its significance over
    the flow noise `flow_noise` (voxels of the training box; binning.significance_shrinkage, 0: as trained) before
    the binning."""
    dev = torch.device(device)
    ps.require(poses=True, ctf=True)
    half = ps.half_sets(seed)
    check_options(iterations, batch_size, reg_scale, tol, bins, flow_tol, max_bins, flow_noise)
    _check_inputs(model, ps, half)
    if progress is None and not distributed.is_main():
        progress = _quiet  # rank 0 alone prints
    emit = Progress(1, "flex-reconstruct", stream=progress).emit
    c = model.crop
    sp = Sphere.make(c, dev)
    z = model.latents[_model_rows(model, ps)]
    d = vertex_displacements(model.gen, z)
    apix_c = model.apix_at(c)
    # the frame: 3D Flex fixes the canonical map only up to a deformation common to all particles (the generator's
    # output at the particles' mean), and trained models carry one (measured: up to 1.3 voxels, also where nothing
    # moves). Solved in the model's frame, the flex map sat that far from its Wiener start and from the truth; in
    # the particles' mean frame, where the Wiener map is, it does not (docs/flex_reconstruction.md)
    mean_d = d.mean(0)
    frame_vox = float(mean_d.norm(dim=-1).max()) / apix_c if mean_d.numel() else 0.0
    d.sub_(mean_d)
    emit(f"flex-reconstruct: the particles' mean deformation (largest vertex displacement {frame_vox:.3f} voxels) "
         "is taken out of the flows: the flex map is in the particles' mean frame, as the Wiener map")
    # the flow noise: trained flows scatter by ~0.1 training-box voxel rms where nothing moves (benchmark models),
    # and a warp by such noise both misaligns and blurs; each vertex keeps its motion in proportion to its
    # significance over that noise (binning.significance_shrinkage), and the bins are chosen on what is kept. The noise
    # is a fraction of the training box's voxel at every crop box (0.09-0.17 in the median over the benchmark models'
    # static vertices at crop boxes 32, 64 and 128: 0.09-0.68 voxels of the crop box), so it is stated in those voxels
    apix_t = model.apix_at(model.train_box)
    keep = significance_shrinkage(d, apix_t, flow_noise)
    d.mul_(keep[None, :, None])
    still = float((keep == 0).float().mean()) if keep.numel() else 0.0
    emit(f"flex-reconstruct: flow noise {flow_noise:g} voxels of the training box ({flow_noise * apix_t / apix_c:.3g} "
         f"of the crop box): {100 * still:.0f} % of the mesh vertices held still, "
         f"the others' motion scaled by {float(keep[keep > 0].median()) if (keep > 0).any() else 0:.2f} (median)")
    if labels is not None:
        lb: LatentBins = bins_from_labels(d, np.asarray(labels, dtype=np.int64), apix_c)
    elif bins is not None:
        lb = choose_bins(z, d, apix_c, tol_vox=0.0, max_bins=min(bins, len(z)), seed=seed) if bins > 1 else \
            bins_from_labels(d, np.zeros(len(z), dtype=np.int64), apix_c)
    else:
        lb = choose_bins(z, d, apix_c, flow_tol, max_bins, seed=seed)
    if distributed.world() > 1:  # every rank inserts into rank 0's bins (k-means is seeded, but be exact)
        lab = torch.as_tensor(lb.labels, dtype=torch.long, device=dev)
        lab = distributed.all_reduce_(lab if distributed.is_main() else torch.zeros_like(lab))
        lb = bins_from_labels(d, lab.cpu().numpy(), apix_c)
    G = lb.count
    acc_mb = 2 * G * sp.index.numel() * 12 / 2 ** 20  # complex64 Σ CTF·Y and float32 Σ CTF², both half sets
    emit(f"flex-reconstruct: {G} latent bins, flow spread {lb.spread_at():.3f} voxels (95 % of particles; "
         f"tolerance {flow_tol:g}), largest {lb.spread.max() if len(lb.spread) else 0:.3f}; accumulators "
         f"{acc_mb:.0f} MB")
    if labels is None and bins is None and lb.spread_at() > flow_tol:
        emit(f"WARNING: --max-bins {max_bins} leaves a flow spread of {lb.spread_at():.3f} voxels within bins, above "
             f"--flow-tol {flow_tol:g}; raise --max-bins for a more exact flex map")
    halves = {h: BinnedHalf(sp, G, dev) for h in (1, 2)}
    prog = Progress(len(ps), "flex-reconstruct: insertion", stream=progress)
    # a batch touches few bins; under torchrun each rank inserts every world-th particle of that order
    order = distributed.shard(np.argsort(lb.labels, kind="stable"))
    world = distributed.world()
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        imgs = torch.from_numpy(ps.images(rows))
        imgs = crop_center(imgs, c, 2) if imgs.shape[-1] != c else imgs
        rots, sh, ctf = ps.rotations(rows), ps.shifts_px(rows), ps.ctf_params(rows)
        for h in (1, 2):
            sel = np.nonzero(half[rows] == h)[0]
            if len(sel):
                halves[h].insert(imgs[sel], rots[sel], sh[sel], ctf[sel], ps.phase_flipped, ps.apix,
                                 lb.labels[rows[sel]])
        prog.step(min(len(ps), world * min(s + batch_size, len(order))))
    for h in (1, 2):  # the ranks' partial sums: every rank then holds all particles' accumulators
        hp = halves[h]
        hp.flush()
        distributed.all_reduce_(hp.num)
        distributed.all_reduce_(hp.den)
        hp.counts = distributed.all_reduce_(torch.as_tensor(hp.counts, device=dev)).cpu().numpy()
    if not distributed.is_main():  # the O(G·D³) solve is rank 0's
        return None
    for h in (1, 2):
        halves[h].freeze()
        halves[h].set_flows(model, lb.displacements)
    m_t = torch.as_tensor(mask, dtype=torch.float32, device=dev) if mask is not None else None
    # the Wiener map's regulariser and shell gain: SSNR from the FSC of barely regularised half maps
    wbar = {h: sp.shell_mean(halves[h].total_den()) for h in (1, 2)}
    rough = {h: sp.crop(halves[h].wiener(1e-3 * wbar[h][sp.shell])) for h in (1, 2)}
    curve = torch.as_tensor(_ssnr_fsc(rough[1], rough[2], m_t), dtype=torch.float32, device=dev)
    for h in (1, 2):
        reg = reg_scale * shell_regulariser(curve, wbar[h])
        halves[h].reg = reg[sp.shell]
        halves[h].gain = ((wbar[h] + reg) / wbar[h].clamp(min=1e-30))[sp.shell]
    starts = {h: halves[h].wiener(halves[h].reg) for h in (1, 2)}
    maps: dict = {}
    objectives: dict = {}
    whys: dict = {}
    full: dict = {}

    def solve(name: str, h: int, op: BinnedHalf, start: torch.Tensor, label: str) -> None:
        step = Progress(iterations, label, every=0, stream=progress)

        def report(it: int, f: float, rel: float) -> None:
            step.step(it, f"objective {f:.6g}, residual {rel:.2e}")
        V, hist, why = pcg(op.hess, op.rhs(start), start, op.precondition, iterations, tol, report)
        step.emit(f"{label}: {why}; objective {hist[0]:.6g} → {hist[-1]:.6g}")
        full[(name, h)] = V
        maps[(name, h)] = op.finish(V)
        objectives[f"{name}_half{h}"] = hist
        whys[f"{name}_half{h}"] = why

    for h in (1, 2):
        solve("flex", h, halves[h], starts[h], f"flex-reconstruct flex half {h}")
    if do_noflex:
        for h in (1, 2):  # D = I: one bin holding all the particles, the Wiener map's regulariser
            hp = halves[h]
            op = BinnedHalf(sp, 1, dev)
            op.num, op.den, op.counts = hp.total_num()[None], hp.total_den()[None], np.array([hp.counts.sum()])
            op.reg, op.gain = hp.reg, hp.gain
            op.freeze()
            solve("noflex", h, op, starts[h], f"flex-reconstruct noflex half {h}")
    f_flex = _ssnr_fsc(torch.as_tensor(maps[("flex", 1)]), torch.as_tensor(maps[("flex", 2)]), m_t)
    if do_noflex:
        f_nf = _ssnr_fsc(torch.as_tensor(maps[("noflex", 1)]), torch.as_tensor(maps[("noflex", 2)]), m_t)
    else:
        f_nf = np.full_like(f_flex, np.nan)
    nf1 = maps.get(("noflex", 1), np.zeros_like(maps[("flex", 1)]))
    nf2 = maps.get(("noflex", 2), np.zeros_like(maps[("flex", 2)]))
    return HighresResult(maps[("flex", 1)], maps[("flex", 2)], nf1, nf2, f_flex, f_nf, ps.apix,
                         fsc_resolution(f_flex, ps.apix),
                         fsc_resolution(f_nf, ps.apix) if do_noflex else float("nan"), objectives,
                         halves[1].finish(starts[1]), halves[2].finish(starts[2]), G, lb.spread_at(), whys,
                         frame_vox, still, (int(halves[1].counts.sum()), int(halves[2].counts.sum())))
