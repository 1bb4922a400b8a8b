"""3D Variability Analysis: probabilistic PCA by expectation–maximisation in Fourier space.

Model (whitened Fourier coefficients of particle i, poses and CTF fixed):
    y_i = α_i C_i S_i (V0 + Σ_k z_ik W_k) + ε_i,    z_i ~ N(0, I),   ε ~ N(0, σ²(|k|)),
with S_i the central slice at the particle's RELION pose (after undoing its origin shift), C_i the CTF,
α_i a per-particle scale and σ² the noise power per frequency shell.

One iteration (streaming over the stack in batches, nothing but the N×K coordinates, N scales and the
per-voxel statistics held in memory):

* **E-step** per image, on the m-pixel working grid (band 0 < |k| < Nyquist): B_i = α C S [W_1..W_K],
  r_i = y_i − α C S V0, M_i = Re(B_iᴴ D B_i) + I, μ_i = M_i⁻¹ Re(B_iᴴ D r_i), E[zzᵀ] = M_i⁻¹ + μμᵀ, with D
  the whitening weights w(k)/σ²(|k|) (w = rfft column multiplicity, so sums equal full-spectrum sums).
  The log-likelihood −½(rᴴDr − bᵀμ + log det M) per image is the objective printed every iteration.
* **M-step**: L = Σ α²C²/σ² E[zzᵀ] (K(K+1)/2 real channels) and R = Σ αC r/σ² μᵀ (K complex channels)
  are inserted with torch-fourier-slice's multichannel insertion into the pad-2 grid, exactly as
  :class:`flexplugin.engine.reconstruct.BackprojectionAccumulator` inserts Σ C·Y and Σ C² (images
  zero-padded to 2m first). Then one K×K solve per Fourier voxel, W(ξ) = (L(ξ) + ρI)⁻¹ R(ξ), with the
  fractional stabiliser ρ = λ · mean_ξ(tr L(ξ)/K) over the voxels inside Nyquist; inverse FFT, sinc²
  gridding correction, crop to m³.
* **Projections** after every M-step, in this order: Butterworth low-pass at the filter resolution
  (order 1.5) and optional high-pass (order 8); the real-space mask (iFFT → × mask → FFT).
* **Re-parametrisation** (keeps the model W zᵀ unchanged, so it is still EM): parameter-expanded EM
  (Liu, Rubin & Wu 1998): W ← W S^{1/2} with S = mean_i E[z_i z_iᵀ], which removes the slow shrink/grow
  mode of plain PPCA EM; then Gram–Schmidt in its symmetric form: eigen-decompose WᵀW = V diag(d) Vᵀ,
  W ← W V. The columns become orthogonal, ordered by d_k, the variance of the model density along
  component k (z ~ N(0, I) is rotation invariant, so rotating W and z together changes nothing).
  Each component's sign is fixed so its largest-magnitude voxel is positive.

Choices made where the cryoSPARC description is silent (see docs/algorithms.md §1), each checked by
experiment on the built-in example (tests/engine/test_va3d.py):

* Working box: images are Fourier-cropped to the smallest even box m whose Nyquist reaches the filter
  frequency (`box_crop` overrides, like cryoSPARC's var_N); components are Fourier-padded back to the
  full box for output. The band |k| < Nyquist of the m box is the only data the E-step sees.
* Noise: σ² per shell of the m grid from the residuals of the images against the scaled consensus
  projection (one streaming pass before the first iteration); `white_noise` uses one σ² for all shells.
* Scales: `optimal` starts from the least-squares scale of each image against the consensus projection
  and is refitted after every E-step against the full model α C S(V0 + Σ μ_k W_k); `none` uses one global
  least-squares scale (it only corrects the units of V0 against the images); `input` multiplies
  rlnCtfScalefactor (or rlnGroupScaleCorrection) by that global scale.
* Initialisation: seeded Gaussian noise in the mask, filtered like the components.
* Final pass: after the last M-step one more E-step gives the coordinates of the final components.
  Outputs are unit-norm component maps at the full box and coordinates z·‖W_k‖, so that
  V0 + Σ z_k Ŵ_k is the model and Var(z_k) estimates the component's explained variance.
* Noise floor (optional): the same EM on pose-shuffled data — residuals computed at the true pose, but
  components sliced and backprojected at another particle's pose. Coherent 3-D variability cancels,
  noise statistics, CTFs, pose distribution and the number of parameters stay. Its largest explained
  variance is the floor that a real component must exceed.

Checkpoints (`checkpoint.pt`) are written atomically after every iteration; restoring one and iterating
on reproduces the uninterrupted run bit for bit on CPU (tests/engine/test_va3d.py).

Several processes (torchrun, engine/distributed.py): every pass walks the same global batches, each rank
loading and scoring its share of every batch; the sufficient statistics (noise sums, the M-step's L and R
grids, Σ E[zzᵀ], the objective, the explained power) are summed over the ranks and the per-particle scales
and coordinates are merged, so every rank holds the state one process would, to float rounding
(tests/engine/test_distributed_jobs.py). Rank 0 alone prints and writes the checkpoint, which holds every particle's
state and so continues under any number of processes.

Measured on the built-in example (2,000 particles, box 64, 2 Å/px, SNR 0.1, K = 3, 8 Å → working box 32,
exact consensus given; |Spearman ρ| of coordinate 0 with the true motion; eigenvalues of components 0–2):
* default, 12 iterations: ρ 0.952, eigenvalues 10555 / 3846 / 1440; pose-shuffled floor 1235 (the arc
  of z0 against z1 is the non-linear hinge+twist seen by a linear model); 20 iterations: ρ 0.952;
* consensus reconstructed from the particles instead: ρ 0.951; white noise model: ρ 0.952;
  `scales none`: ρ 0.951; high-pass 30 Å: ρ 0.935;
* without the PX-EM step the variances are still growing after 12 iterations (743 vs 1330 for
  component 0 in the per-iteration log, objective 386.63 vs 386.44): plain PPCA EM converges slowly;
* the same object without motion: eigenvalues 820 / 693 / 643 against a floor of 782: at the floor.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch_fourier_slice.volume_utils import separable_sinc2_correction

from .. import distributed
from ..atomic import torch_save, write_json
from ..ctf import compute_ctf
from ..errors import InputError
from ..fourier import (
    butterworth_highpass,
    butterworth_lowpass,
    crop_center,
    irfft2c,
    irfft3c,
    pad_images,
    radius_2d,
    radius_3d,
    rfft2c,
    rfft3c,
    shift_phase_2d,
)
from ..io import ParticleSet
from ..progress import Progress
from ..projector import prepare_volume_ft
from ..va3d_config import VA3DConfig  # the settings, torch-free (declared once there)
from .slicing import Band, insert_slices, make_band, scatter_band, slice_band

__all__ = ["VA3DConfig", "VA3DResult", "VA3D", "working_box", "fourier_crop_ft_2d", "fourier_resize_3d",
           "estep", "INPUT_SCALE_LABELS"]

INPUT_SCALE_LABELS = ("rlnCtfScalefactor", "rlnGroupScaleCorrection")
CHECKPOINT = "checkpoint.pt"


@dataclass
class VA3DResult:
    """What a finished run returns (numpy, output conventions; see module docstring)."""

    components: np.ndarray  # (K, n, n, n) unit-norm maps at the full box
    latents: np.ndarray  # (N, K) float32, input row order
    scales: np.ndarray  # (N,) float32
    eigenvalues: np.ndarray  # (K,) model variance along each unit component (map units², full box)
    latent_variance: np.ndarray  # (K,) empirical variance of the coordinates
    power_fraction: np.ndarray  # (K,) fraction of the whitened residual power explained, per component
    history: list[dict] = field(default_factory=list)
    working_box: int = 0
    working_apix: float = 0.0
    global_scale: float = 1.0


def working_box(box: int, apix: float, filter_res: float, box_crop: int | None = None) -> int:
    """Smallest even box ≤ `box` whose Nyquist reaches 1/filter_res (or `box_crop` if given)."""
    if box_crop:
        return int(box_crop)
    m = int(math.ceil(2.0 * box * apix / filter_res - 1e-9))
    m += m % 2
    return max(8, min(box, m))


def fourier_crop_ft_2d(ft: torch.Tensor, m: int) -> torch.Tensor:
    """Crop a centred rfft (..., n, n//2+1) to (..., m, m//2+1) (no rescaling)."""
    n = ft.shape[-2]
    if m == n:
        return ft
    lo = n // 2 - m // 2
    return ft[..., lo:lo + m, : m // 2 + 1]


def fourier_resize_3d(vol: torch.Tensor, n: int) -> torch.Tensor:
    """Resample real volumes (..., m, m, m) to (..., n, n, n) by cropping or zero-padding the spectrum.

    Values are preserved (a constant stays the same constant), as in fourier.fourier_crop_3d.
    """
    m = vol.shape[-1]
    if m == n:
        return vol
    ft = rfft3c(vol)
    out = torch.zeros(*ft.shape[:-3], n, n, n // 2 + 1, dtype=ft.dtype, device=ft.device)
    s = min(m, n)
    lo_i, lo_o = m // 2 - s // 2, n // 2 - s // 2
    out[..., lo_o:lo_o + s, lo_o:lo_o + s, : s // 2 + 1] = ft[..., lo_i:lo_i + s, lo_i:lo_i + s, : s // 2 + 1]
    return irfft3c(out, n) * (n ** 3) / (m ** 3)


def estep(y: torch.Tensor, ctf: torch.Tensor, slices: torch.Tensor, alpha: torch.Tensor,
          weights: torch.Tensor) -> dict:
    """Batched PPCA E-step on band vectors.

    y (B, nb) complex data; ctf (B, nb) real; slices (B, 1+K, nb) complex = S_i[V0, W_1..W_K];
    alpha (B,); weights (nb,) = w/σ². Returns mu (B, K), sigma (B, K, K), ezz (B, K, K), loglik (B,),
    r (B, nb) residual y − α C S V0, bmat (B, K, nb) = α C S W, G (B, K, K) = Re(BᴴDB).
    """
    a = alpha[:, None]
    p0 = ctf * slices[:, 0]
    r = y - a * p0
    bm = (a * ctf)[:, None, :] * slices[:, 1:]
    bw = bm * weights
    G = torch.einsum("bkn,bln->bkl", bw.conj(), bm).real
    b = torch.einsum("bkn,bn->bk", bw.conj(), r).real
    K = bm.shape[1]
    M = G + torch.eye(K, device=y.device, dtype=G.dtype)
    Lc = torch.linalg.cholesky(M)
    sigma = torch.cholesky_inverse(Lc)
    mu = (sigma @ b[..., None])[..., 0]
    ezz = sigma + mu[:, :, None] * mu[:, None, :]
    rr = (r.real.square() + r.imag.square()) @ weights
    logdet = 2 * torch.log(torch.diagonal(Lc, dim1=-2, dim2=-1)).sum(-1)
    loglik = -0.5 * (rr - (b * mu).sum(-1) + logdet)
    return {"mu": mu, "sigma": sigma, "ezz": ezz, "loglik": loglik, "r": r, "bmat": bm, "G": G, "rr": rr}


def _progress(total: int, label: str) -> Progress:
    """A pass's progress lines: rank 0 prints them (with the global counts), the other ranks are quiet."""
    return Progress(total, label, every=60.0, stream=None if distributed.is_main() else (lambda _line: None))


def _tick(prog: Progress, done: int, total: int) -> None:
    """Within-pass progress only for long passes (after a minute, then every minute); never the final
    line, which the per-iteration summary replaces."""
    if done < total and time.monotonic() - prog.t0 > prog.every:
        prog.step(done)


def _sym_sqrt(S: torch.Tensor) -> torch.Tensor:
    e, V = torch.linalg.eigh(S.double())
    return ((V * e.clamp(min=1e-12).sqrt()) @ V.T).to(S.dtype)


def _tri_indices(K: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(K) for b in range(a, K)]


class VA3D:
    """State and passes of one 3DVA run on a ParticleSet (see module docstring).

    `null_permutation` (optional, length N) turns the run into the pose-shuffled null used for the
    noise floor: components are sliced/backprojected at the pose of particle perm[i].
    """

    def __init__(self, particles: ParticleSet, mask: np.ndarray, consensus: np.ndarray, cfg: VA3DConfig,
                 null_permutation: np.ndarray | None = None, log: Callable[[str], None] = print):
        self.ps, self.cfg, self.log = particles, cfg, log
        self.dev = torch.device(cfg.device)
        self.n, self.apix = particles.box, particles.apix
        self.m = working_box(self.n, self.apix, cfg.filter_res, cfg.box_crop)
        self.apix_m = self.apix * self.n / self.m
        self.N, self.K = len(particles), cfg.k
        self.perm = None if null_permutation is None else np.asarray(null_permutation, dtype=np.int64)
        dev, m = self.dev, self.m
        self.band: Band = make_band(m, dev)
        self.mask_full = torch.as_tensor(mask, dtype=torch.float32)
        self.mask_m = fourier_resize_3d(self.mask_full.to(dev), m).clamp(0, 1)
        self.v0_full = torch.as_tensor(consensus, dtype=torch.float32)
        self.v0_m = fourier_resize_3d(self.v0_full.to(dev), m)
        # filter on the m³ grid
        k3 = radius_3d(m, dev) / self.apix_m  # 1/Å
        h = butterworth_lowpass(k3, 1.0 / cfg.filter_res, cfg.filter_order)
        if cfg.highpass_res:
            h = h * butterworth_highpass(k3, 1.0 / cfg.highpass_res, cfg.highpass_order)
        self.filt = h
        M2 = 2 * m
        self.sphere = radius_3d(M2, dev) < 0.5  # voxels of the pad-2 grid inside Nyquist
        self.sinc2 = separable_sinc2_correction((M2, M2, M2), device=dev)
        self.r2 = radius_2d(M2, dev)  # cycles/px on the padded 2-D grid
        self.tri = _tri_indices(self.K)
        # state
        self.W: torch.Tensor | None = None  # (K, m, m, m)
        self.alpha: torch.Tensor | None = None  # (N,) on CPU
        self.global_scale = 1.0
        self.sigma2: torch.Tensor | None = None  # (n_shells,) per shell of the m grid
        self.iteration = 0
        self.history: list[dict] = []
        self.done = 0  # particles in the global batches walked so far in the current pass (progress lines)
        self._input_scales = self._read_input_scales() if cfg.scales == "input" else None

    # ------------------------------------------------------------------ data
    def _read_input_scales(self) -> np.ndarray:
        for lab in INPUT_SCALE_LABELS:
            if lab in self.ps.table:
                v = self.ps.table[lab].to_numpy(np.float64)
                if not np.all(np.isfinite(v)) or np.any(v <= 0):
                    raise InputError(f"{lab} has non-positive or non-finite values; use --scales optimal")
                return v.astype(np.float32)
        raise InputError(f"--scales input needs a per-particle scale column ({' or '.join(INPUT_SCALE_LABELS)}) "
                         "in the particle STAR file; use --scales optimal or none instead")

    def batches(self):
        """This rank's share of each global batch (all of it in one process); `self.done` is then the number
        of particles the global batches so far hold, for the progress lines."""
        bs = self.cfg.batch_size
        for s in range(0, self.N, bs):
            self.done = min(self.N, s + bs)
            rows = distributed.shard(np.arange(s, self.done))
            if len(rows):  # empty when there are more ranks than images in a last small batch
                yield rows

    def load(self, rows: np.ndarray) -> dict:
        """Images of `rows` as band vectors on the m grid (shift undone), CTFs, poses."""
        ps, dev, m, n = self.ps, self.dev, self.m, self.n
        imgs = torch.from_numpy(ps.images(rows)).to(dev)
        ft = fourier_crop_ft_2d(rfft2c(imgs), m) * ((m / n) ** 3)
        y = self.band.take(ft)
        # re-centre exactly as reconstruct.BackprojectionAccumulator does (origins in pixels of the m box)
        y = y * self.band.take(shift_phase_2d(m, ps.shifts_px(rows, dev) * (m / n)))
        ctfp = ps.ctf_params(rows, dev)
        ctf = self.band.take(compute_ctf(ctfp, m, self.apix_m, ps.phase_flipped))
        rot = ps.rotations(rows, dev)
        rot_c = rot if self.perm is None else ps.rotations(self.perm[rows], dev)
        return {"rows": rows, "y": y, "ctf": ctf, "ctfp": ctfp, "rot": rot, "rot_c": rot_c}

    def weights(self) -> torch.Tensor:
        assert self.sigma2 is not None, "noise_pass (or restore) sets sigma2 first"
        s = self.band.shell.clamp(max=len(self.sigma2) - 1)
        return self.band.weight / self.sigma2.to(self.dev)[s]

    # ------------------------------------------------------------------ passes
    def _v0_spectrum(self) -> torch.Tensor:
        return prepare_volume_ft(self.v0_m, 2)[None]

    def noise_pass(self) -> None:
        """Initial scales (least squares against the consensus) and the noise spectrum from residuals."""
        f0 = self._v0_spectrum()
        n_sh = self.m // 2 + 1
        num = torch.zeros(n_sh, dtype=torch.float64, device=self.dev)
        cnt = torch.zeros(n_sh, dtype=torch.float64, device=self.dev)
        alpha = torch.zeros(self.N, dtype=torch.float32)
        py = pp = 0.0
        w = self.band.weight
        prog = _progress(self.N, "3dva noise")
        mine = []
        for rows in self.batches():
            mine.append(rows)
            d = self.load(rows)
            p0 = d["ctf"] * slice_band(f0, d["rot"], self.band)[:, 0]
            a_num = ((p0.conj() * d["y"]).real * w).sum(-1)
            a_den = ((p0.real.square() + p0.imag.square()) * w).sum(-1)
            if self._input_scales is not None:
                s_in = torch.as_tensor(self._input_scales[rows], device=self.dev)
                py += float((s_in * a_num).sum())
                pp += float((s_in.square() * a_den).sum())
                a = s_in
            else:
                py += float(a_num.sum())
                pp += float(a_den.sum())
                a = a_num / a_den.clamp(min=1e-30)
            alpha[rows] = a.cpu()
            res = d["y"] - a[:, None] * p0
            e = (res.real.square() + res.imag.square()) * w
            num.index_add_(0, self.band.shell, e.sum(0).double())
            cnt.index_add_(0, self.band.shell, w.double().expand_as(e).sum(0))
            _tick(prog, self.done, self.N)
        if distributed.world() > 1:  # the sums of every rank's particles; each particle's scale from its rank
            py, pp = distributed.all_reduce_(torch.tensor([py, pp], dtype=torch.float64)).tolist()
            distributed.all_reduce_(num)
            distributed.all_reduce_(cnt)
            distributed.merge_rows_(alpha, np.concatenate(mine) if mine else np.zeros(0, np.int64))
        g = py / pp if pp > 0 else 1.0
        if not np.isfinite(g) or g <= 0:
            raise InputError("the consensus map does not correlate with the particle images (global scale "
                             f"{g:.3g}); check that the map, poses and CTF belong to these particles")
        self.global_scale = g
        if self.cfg.scales == "none":
            alpha[:] = g
        elif self.cfg.scales == "input":
            alpha *= g
        self.alpha = alpha
        valid = cnt > 0
        s2 = torch.where(valid, num / cnt.clamp(min=1), torch.zeros_like(num))
        if self.cfg.white_noise:
            s2 = torch.full_like(s2, float(num[valid].sum() / cnt[valid].sum()))
        # shells without samples (DC) borrow their neighbour's value
        s2[~valid] = s2[valid][0]
        self.sigma2 = s2.float().cpu()

    def init_components(self) -> None:
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed)
        W = torch.randn(self.K, self.m, self.m, self.m, generator=g).to(self.dev)
        W = self.project_constraints(W)
        rms0 = (self.v0_m * self.mask_m).square().mean().sqrt()
        W = W / W.square().mean(dim=(1, 2, 3), keepdim=True).sqrt() * 0.1 * rms0
        self.W = self.reparametrise(W, None)

    def project_constraints(self, W: torch.Tensor) -> torch.Tensor:
        """Band-pass filter, then the real-space mask."""
        W = irfft3c(rfft3c(W) * self.filt, self.m)
        return W * self.mask_m

    def reparametrise(self, W: torch.Tensor, S: torch.Tensor | None) -> torch.Tensor:
        """PX-EM scaling by S^{1/2}, symmetric Gram–Schmidt and ordering (see module docstring)."""
        K = self.K
        flat = W.reshape(K, -1)
        if S is not None and self.cfg.px_em:
            flat = _sym_sqrt(S.to(flat.dtype)).T @ flat  # W ← W S^{1/2} (columns are rows of flat)
        if self.cfg.gram_schmidt:
            G = (flat.double() @ flat.double().T)
            d, V = torch.linalg.eigh(G)
            V = V.flip(-1).to(flat.dtype)
            flat = V.T @ flat
        idx = flat.abs().argmax(1)
        sign = torch.sign(flat.gather(1, idx[:, None]))[:, 0]
        sign[sign == 0] = 1
        flat = flat * sign[:, None]
        return flat.reshape(W.shape)

    def _components_spectrum(self) -> torch.Tensor:
        assert self.W is not None, "init_components (or restore) sets W first"
        vols = torch.cat([self.v0_m[None], self.W], 0)
        return torch.stack([prepare_volume_ft(v, 2) for v in vols])

    def iterate(self) -> dict:
        """One E-step + M-step over all particles; updates W, alpha; returns the iteration record."""
        t0 = time.time()
        dev, m, K = self.dev, self.m, self.K
        M2 = 2 * m
        F = self._components_spectrum()
        wts = self.weights()
        assert self.sigma2 is not None and self.alpha is not None
        n_sh = len(self.sigma2)
        s2_pad = self.sigma2.to(dev)[(self.r2 * m).round().long().clamp(max=n_sh - 1)]  # (2m, m+1)
        inv_s2_pad = torch.where(self.r2 < 0.5, 1.0 / s2_pad, torch.zeros_like(s2_pad))
        nL = len(self.tri)
        acc = [torch.zeros(nL, M2, M2, m + 1, device=dev), torch.zeros(K, M2, M2, m + 1, dtype=torch.complex64,
                                                                         device=dev)]
        S = torch.zeros(K, K, dtype=torch.float64, device=dev)
        ll = 0.0
        new_alpha = self.alpha.clone()
        prog = _progress(self.N, f"3dva iteration {self.iteration + 1}")
        mine = []
        for rows in self.batches():
            mine.append(rows)
            d = self.load(rows)
            a = self.alpha[rows].to(dev)
            sl = slice_band(F, d["rot_c"], self.band)
            if self.perm is not None:  # null: the consensus is still sliced at the true pose
                sl[:, 0] = slice_band(F[:1], d["rot"], self.band)[:, 0]
            e = estep(d["y"], d["ctf"], sl, a, wts)
            ll += float(e["loglik"].sum())
            S += e["ezz"].sum(0).double()
            self._accumulate(acc, d, a, e, inv_s2_pad)
            if self.cfg.scales == "optimal":
                new_alpha[rows] = self._refit_scales(d, sl, e["mu"], wts).cpu()
            _tick(prog, self.done, self.N)
        if distributed.world() > 1:  # the M-step's statistics over all particles
            ll = float(distributed.all_reduce_(torch.tensor([ll], dtype=torch.float64)).item())
            distributed.all_reduce_(S)
            for a in acc:
                distributed.all_reduce_(a)
            if self.cfg.scales == "optimal":
                distributed.merge_rows_(new_alpha, np.concatenate(mine) if mine else np.zeros(0, np.int64))
        S /= self.N
        W_new = self._solve(acc)
        W_new = self.project_constraints(W_new)
        W_new = self.reparametrise(W_new, S.float())
        change = self.subspace_change(self.W, W_new)
        self.W = W_new
        self.alpha = new_alpha
        self.iteration += 1
        rec = {"iteration": self.iteration, "objective": -ll / self.N, "subspace_change": change,
               "eigenvalues": self.eigenvalues_m().tolist(), "seconds": time.time() - t0}
        prev = self.history[-1]["objective"] if self.history else None
        rec["objective_change"] = None if prev is None else rec["objective"] - prev
        self.history.append(rec)
        return rec

    def _accumulate(self, acc: list, d: dict, a: torch.Tensor, e: dict, inv_s2_pad: torch.Tensor) -> None:
        """Insert this batch's L (real) and R (complex) channels into acc = [L, R] on the pad-2 grid."""
        m, M2 = self.m, 2 * self.m
        c2 = compute_ctf(d["ctfp"], M2, self.apix_m, self.ps.phase_flipped)  # (B, 2m, m+1)
        r_img = irfft2c(scatter_band(e["r"], self.band), m)
        r_pad = rfft2c(pad_images(r_img, M2))
        base_r = (a[:, None, None] * c2 * inv_s2_pad) * r_pad  # (B, 2m, m+1) complex
        base_l = (a[:, None, None] * c2).square() * inv_s2_pad  # real
        mu, ezz = e["mu"], e["ezz"]
        ii = torch.tensor([i for i, _ in self.tri], device=self.dev)
        jj = torch.tensor([j for _, j in self.tri], device=self.dev)
        lv = base_l[:, None] * ezz[:, ii, jj][:, :, None, None]  # (B, nL, 2m, m+1)
        rv = base_r[:, None] * mu[:, :, None, None].to(base_r.dtype)  # (B, K, 2m, m+1)
        insert_slices(lv, rv, d["rot_c"].transpose(-1, -2), M2, 0.5, out_real=acc[0], out_cplx=acc[1])

    def _solve(self, acc: list) -> torch.Tensor:
        K, m, M2 = self.K, self.m, 2 * self.m
        sph = self.sphere
        Lc = acc[0][:, sph]  # (nL, V)
        Rc = acc[1][:, sph]  # (K, V)
        V = Lc.shape[1]
        L = torch.zeros(V, K, K, device=Lc.device, dtype=torch.float32)
        for c, (i, j) in enumerate(self.tri):
            L[:, i, j] = Lc[c]
            L[:, j, i] = Lc[c]
        ridge = self.cfg.lam * float(torch.diagonal(L, dim1=-2, dim2=-1).mean())
        if ridge <= 0:
            ridge = 1e-6 * float(torch.diagonal(L, dim1=-2, dim2=-1).abs().mean() + 1e-30)
        L = L + ridge * torch.eye(K, device=L.device)
        rhs = torch.stack([Rc.real.T, Rc.imag.T], -1)  # (V, K, 2)
        X = torch.linalg.solve(L, rhs)
        Wft = torch.zeros(K, M2, M2, m + 1, dtype=torch.complex64, device=Lc.device)
        Wft[:, sph] = torch.complex(X[..., 0], X[..., 1]).T
        W = irfft3c(Wft, M2) / self.sinc2
        return crop_center(W, m, 3)

    def _refit_scales(self, d: dict, sl: torch.Tensor, mu: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        model = d["ctf"] * (sl[:, 0] + torch.einsum("bk,bkn->bn", mu.to(sl.real.dtype).to(sl.dtype), sl[:, 1:]))
        num = ((model.conj() * d["y"]).real * wts).sum(-1)
        den = ((model.real.square() + model.imag.square()) * wts).sum(-1)
        return num / den.clamp(min=1e-30)

    # ------------------------------------------------------------------ results
    def eigenvalues_m(self) -> np.ndarray:
        """Model variance along each component (z ~ N(0, I)): Σ W_k² over the m³ grid times (n/m)³, which by
        Parseval equals the sum over the full n³ box of the Fourier-padded component (the output units)."""
        assert self.W is not None, "init_components (or restore) sets W first"
        return self.W.reshape(self.K, -1).square().sum(1).double().cpu().numpy() * (self.n / self.m) ** 3

    @staticmethod
    def subspace_change(W0: torch.Tensor | None, W1: torch.Tensor) -> float:
        """1 − mean squared cosine of the principal angles between the two component subspaces."""
        if W0 is None:
            return 1.0
        K = W1.shape[0]
        q0 = torch.linalg.qr(W0.reshape(K, -1).double().T)[0]
        q1 = torch.linalg.qr(W1.reshape(K, -1).double().T)[0]
        return float(1.0 - (q0.T @ q1).square().sum() / K)

    def final_pass(self) -> dict:
        """E-step with the final components: coordinates, scales, explained power per component."""
        dev, K = self.dev, self.K
        F = self._components_spectrum()
        wts = self.weights()
        assert self.alpha is not None, "noise_pass (or restore) sets alpha first"
        mu_all = torch.zeros(self.N, K, dtype=torch.float32)
        expl = torch.zeros(K, dtype=torch.float64)
        total = 0.0
        ll = 0.0
        prog = _progress(self.N, "3dva coordinates")
        mine = []
        for rows in self.batches():
            mine.append(rows)
            d = self.load(rows)
            a = self.alpha[rows].to(dev)
            sl = slice_band(F, d["rot_c"], self.band)
            if self.perm is not None:
                sl[:, 0] = slice_band(F[:1], d["rot"], self.band)[:, 0]
            e = estep(d["y"], d["ctf"], sl, a, wts)
            mu_all[rows] = e["mu"].cpu()
            Gd = torch.diagonal(e["G"], dim1=-2, dim2=-1)  # ‖B_k‖²_D
            expl += (torch.diagonal(e["ezz"], dim1=-2, dim2=-1) * Gd).sum(0).double().cpu()
            total += float(e["rr"].sum())
            ll += float(e["loglik"].sum())
            _tick(prog, self.done, self.N)
        if distributed.world() > 1:
            distributed.merge_rows_(mu_all, np.concatenate(mine) if mine else np.zeros(0, np.int64))
            distributed.all_reduce_(expl)
            total, ll = distributed.all_reduce_(torch.tensor([total, ll], dtype=torch.float64)).tolist()
        return {"mu": mu_all.numpy(), "power_fraction": (expl / max(total, 1e-30)).numpy(),
                "objective": -ll / self.N}

    def result(self, final: dict) -> VA3DResult:
        """Full-box unit-norm components and coordinates scaled to match (model unchanged)."""
        assert self.W is not None and self.alpha is not None, "iterate (or restore) sets W and alpha first"
        W = fourier_resize_3d(self.W, self.n).cpu() * self.mask_full
        norms = W.reshape(self.K, -1).norm(dim=1).clamp(min=1e-30)
        comps = (W / norms[:, None, None, None]).numpy().astype(np.float32)
        z = (final["mu"] * norms.numpy()[None, :]).astype(np.float32)
        return VA3DResult(comps, z, self.alpha.numpy().astype(np.float32), (norms.double() ** 2).numpy(),
                          z.var(0).astype(np.float64), final["power_fraction"], list(self.history),
                          self.m, self.apix_m, self.global_scale)

    # ------------------------------------------------------------------ checkpoints
    def state(self, key: dict) -> dict:
        assert self.W is not None, "init_components (or restore) sets W first"
        return {"key": key, "iteration": self.iteration, "W": self.W.cpu(), "alpha": self.alpha,
                "sigma2": self.sigma2, "global_scale": self.global_scale, "history": self.history,
                "v0_m": self.v0_m.cpu()}

    def save(self, path: str | os.PathLike, key: dict) -> None:
        torch_save(self.state(key), path)  # atomic: a kill during the save keeps the last checkpoint

    def restore(self, path: str | os.PathLike, key: dict) -> None:
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st["key"] != key:
            diff = {k: (st["key"].get(k), v) for k, v in key.items() if st["key"].get(k) != v}
            raise InputError(f"cannot continue from {path}: its settings differ from this run's {diff}; "
                             "start a new run in another folder or drop --continue")
        self.iteration = int(st["iteration"])
        self.W = st["W"].to(self.dev)
        self.alpha = st["alpha"]
        self.sigma2 = st["sigma2"]
        self.global_scale = float(st["global_scale"])
        self.history = list(st["history"])
        self.v0_m = st["v0_m"].to(self.dev)


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha1 of a file's bytes (identifies the mask/volume a checkpoint was made with)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def run_loop(va: VA3D, iterations: int, ckpt: str | os.PathLike | None, key: dict,
             log: Callable[[str], None] = print, label: str = "3dva") -> dict:
    """Iterate until `iterations` are done (checkpointing each), then the final pass."""
    if va.W is None:
        va.noise_pass()
        va.init_components()
    t_start = time.time()
    start_it = va.iteration
    for it in range(va.iteration, iterations):
        rec = va.iterate()
        if ckpt is not None and distributed.is_main():  # every rank holds the same state; rank 0 saves it
            va.save(ckpt, key)
        done = it + 1 - start_it
        el = time.time() - t_start
        eta = el / done * (iterations - it - 1)
        chg = rec["objective_change"]
        ev = ", ".join(f"{v:.3g}" for v in rec["eigenvalues"])
        if distributed.is_main():
            log(f"{label}: iteration {rec['iteration']}/{iterations} objective {rec['objective']:.6g} "
                f"change {'—' if chg is None else f'{chg:+.4g}'} subspace change {rec['subspace_change']:.2e} "
                f"variances [{ev}] {rec['seconds']:.1f}s ETA {int(eta) // 60}:{int(eta) % 60:02d}")
    return va.final_pass()


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def dump_json(path: str | os.PathLike, obj) -> None:
    write_json(path, obj, default=json_default)
