"""Honest resolution: masked FSC corrected by phase randomisation, local resolution, and the local resolution gain.

Conventions are RELION's post-processing (see docs/resolution.md):

- FSC shells are integer radii in Fourier pixels, shell i at i/(N·apix) 1/Å, i = 0..N//2 (a Fourier voxel
  belongs to shell round(|k|·N)).
- Masked FSC: both half maps multiplied by the same soft mask. The mask's own Fourier transform spreads the shared
  low-resolution signal to high frequencies, which inflates the masked FSC. To measure that inflation the phases of
  both half maps are replaced by independent random phases beyond the shell where the unmasked FSC first drops
  below 0.8, the randomised maps are masked and their FSC (FSC_rand) computed; from two shells beyond that shell on,
  FSC_true = (FSC_masked − FSC_rand) / (1 − FSC_rand); below it FSC_true = FSC_masked.
- Local resolution: at each point of a grid, the FSC of the two half maps inside a soft spherical window; the
  local resolution is where that FSC first drops below 0.143 (the half-map threshold), linearly interpolated; the
  map is the window-weighted average of 1/resolution over the windows covering a voxel, as RELION does.
- Gain: local resolution of the rigid (noflex) map minus that of the flex map, in Å, positive where undoing the
  motion helped.

numpy/torch only; every torch path runs on the device of its inputs.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import save_plot, write_json, write_text
from .errors import InputError
from .io import write_volume

__all__ = ["FSC_THRESHOLD", "LOCRES_THRESHOLD", "RANDOMIZE_FSC_AT", "MaskedFSC", "auto_mask", "fsc_batch",
           "fsc_curve", "local_resolution", "masked_fsc", "randomize_phases", "resolution_at", "resolutions_at",
           "shell_index", "soft_edge", "spherical_mask", "write_fsc_star", "write_resolution_outputs"]

RANDOMIZE_FSC_AT = 0.8  # RELION's default: randomise phases beyond where the unmasked FSC drops below this
FSC_THRESHOLD = 0.143  # half-map FSC threshold for the global resolution
LOCRES_THRESHOLD = 0.143  # and for the local resolution (RELION's choice; 0.5 is an option)


# ------------------------------------------------------------------------------------------------ shells and FSC
def shell_index(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Integer shell round(|k|·n) of every voxel of an n³ volume's rfftn (unshifted layout), shape (n, n, n//2+1)."""
    k = torch.fft.fftfreq(n, device=device, dtype=torch.float64) * n
    kx = torch.fft.rfftfreq(n, device=device, dtype=torch.float64) * n
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return torch.round(r).long()


def _rfft_weights(n: int, device) -> torch.Tensor:
    """Weight 2 for rfft columns that stand for a column and its Friedel mate, 1 for kx = 0 (and kx = n/2, even n),
    so sums over the half spectrum equal sums over the full one."""
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64, device=device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def fsc_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FSC of volume pairs (B, n, n, n) → (B, n//2+1) (float64 if the maps are, else float32): per shell
    Re Σ A·B* / sqrt(Σ|A|² Σ|B|²) over the full spectrum; a shell whose power is zero in either map gets 0."""
    n = a.shape[-1]
    dt = torch.float64 if a.dtype == torch.float64 else torch.float32
    A = torch.fft.rfftn(a.to(dt), dim=(-3, -2, -1))
    Bf = torch.fft.rfftn(b.to(dt), dim=(-3, -2, -1))
    idx = shell_index(n, a.device)
    keep = (idx <= n // 2).reshape(-1)
    shells = idx.reshape(-1)[keep]
    w = _rfft_weights(n, a.device).to(dt).expand(idx.shape).reshape(-1)[keep]  # Friedel weights

    def per_shell(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], n // 2 + 1, dtype=dt, device=a.device)
        return out.index_add_(1, shells, x.reshape(x.shape[0], -1)[:, keep] * w)

    cross = per_shell(A.real * Bf.real + A.imag * Bf.imag)
    den = torch.sqrt(per_shell(A.real ** 2 + A.imag ** 2) * per_shell(Bf.real ** 2 + Bf.imag ** 2))
    ok = den > 0
    return torch.where(ok, cross / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(den))


def fsc_curve(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """FSC of two cubic volumes, n//2+1 shells (shell i at i/(n·apix) 1/Å)."""
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return fsc_batch(a[None], b[None])[0].cpu().numpy()


def resolution_at(curve: np.ndarray, n: int, apix: float, threshold: float = FSC_THRESHOLD) -> float:
    """Resolution (Å) where an FSC curve of an n-pixel box first drops below `threshold` (linear interpolation in
    frequency between the last shell above and the first below); Nyquist (2·apix) if it never drops, n·apix (the
    first shell) if shell 1 is already below."""
    return float(resolutions_at(np.asarray(curve)[None], n, apix, threshold)[0])


def resolutions_at(curves: np.ndarray, n: int, apix: float, threshold: float = FSC_THRESHOLD) -> np.ndarray:
    """`resolution_at` for a batch of curves (B, n//2+1) at once."""
    c = np.asarray(curves, dtype=np.float64)
    below = c[:, 1:] < threshold
    first = np.where(below.any(1), below.argmax(1) + 1, 0)  # first shell below, 0: never
    i = np.maximum(first, 2)
    rows = np.arange(len(c))
    c0, c1 = c[rows, i - 1], c[rows, np.minimum(i, c.shape[1] - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        shell = i - 1 + np.clip((c0 - threshold) / (c0 - c1), 0.0, 1.0)
        res = n * apix / shell
    res = np.where(first == 0, 2.0 * apix, res)
    return np.where(first == 1, float(n * apix), res)


# ------------------------------------------------------------------------------------------------ masks
def soft_edge(hard: np.ndarray, width_px: float) -> np.ndarray:
    """A soft mask from a binary one: 1 inside, a raised-cosine fall-off to 0 over `width_px` pixels outside
    (by Euclidean distance), so masking does not ring in Fourier space."""
    from scipy import ndimage
    hard = np.asarray(hard, dtype=bool)
    if width_px <= 0:
        return hard.astype(np.float32)
    dist = ndimage.distance_transform_edt(~hard)
    soft = np.where(dist <= width_px, 0.5 * (1.0 + np.cos(np.pi * np.clip(dist / width_px, 0, 1))), 0.0)
    return np.where(hard, 1.0, soft).astype(np.float32)


def spherical_mask(n: int, radius_px: float, edge_px: float, center: tuple[float, float, float] | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """A sphere of radius `radius_px` around `center` (default n//2 on every axis) in an n³ box with a
    raised-cosine edge `edge_px` wide (RELION's raisedCosineMask): 1 inside, 0 beyond radius + edge."""
    c = (n // 2,) * 3 if center is None else center
    g = torch.arange(n, device=device, dtype=torch.float32)
    r = torch.sqrt((g[:, None, None] - c[0]) ** 2 + (g[None, :, None] - c[1]) ** 2 + (g[None, None, :] - c[2]) ** 2)
    if edge_px <= 0:
        return (r <= radius_px).float()
    t = torch.clamp((r - radius_px) / edge_px, 0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def auto_mask(volumes: list[np.ndarray], apix: float, lowpass_A: float = 15.0, threshold: float = 0.1,
              dilate_px: int = 2, edge_px: int = 4) -> np.ndarray:
    """A soft mask around the density of all `volumes` (when the user gives none): their voxel-wise maximum,
    low-passed at `lowpass_A`, thresholded at `threshold` of its maximum but never below the solvent's mean + 5 sd
    (measured in the box's corners, beyond 0.45 box from the centre), dilated, with a cosine edge."""
    from scipy import ndimage

    from .fourier import lowpass_volume
    env = np.max(np.stack([np.asarray(v, np.float32) for v in volumes]), 0)
    lp = lowpass_volume(torch.as_tensor(env), max(lowpass_A, 2.5 * apix), apix, order=4).numpy()
    n = lp.shape[0]
    g = np.arange(n) - n // 2
    corners = (g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2) > (0.45 * n) ** 2
    floor = float(lp[corners].mean() + 5 * lp[corners].std()) if corners.any() else -np.inf
    hard = lp > max(threshold * float(lp.max()), floor)
    if dilate_px > 0:
        hard = ndimage.binary_dilation(hard, iterations=dilate_px)
    return soft_edge(hard, edge_px)


# ------------------------------------------------------------------------------------------------ phase randomisation
def randomize_phases(vol: np.ndarray | torch.Tensor, beyond_shell: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """The volume with every Fourier component of shell > `beyond_shell` given a random phase (amplitudes kept).

    The phases are those of the Fourier transform of real white noise, so they have the Friedel symmetry of a real
    map and the result is real; shells up to `beyond_shell` are untouched."""
    v = torch.as_tensor(np.asarray(vol) if not isinstance(vol, torch.Tensor) else vol, dtype=torch.float64)
    n = v.shape[-1]
    F = torch.fft.rfftn(v, dim=(-3, -2, -1))
    noise = torch.randn(v.shape, generator=generator, dtype=torch.float64, device="cpu" if generator is None
                        else generator.device).to(v.device)
    P = torch.fft.rfftn(noise, dim=(-3, -2, -1))
    phase = P / torch.where(P.abs() > 0, P.abs(), torch.ones_like(P.abs()))
    beyond = shell_index(n, v.device) > beyond_shell
    F = torch.where(beyond, F.abs() * phase, F)
    return torch.fft.irfftn(F, s=v.shape[-3:], dim=(-3, -2, -1))


# ------------------------------------------------------------------------------------------------ masked FSC
@dataclass
class MaskedFSC:
    """FSC curves of two half maps (n//2+1 shells each) and the resolutions they give (Å at 0.143)."""

    frequency: np.ndarray  # 1/Å per shell
    unmasked: np.ndarray
    masked: np.ndarray | None = None
    randomized: np.ndarray | None = None  # FSC of the phase-randomised, masked half maps
    corrected: np.ndarray | None = None  # FSC_true; the unmasked FSC without a mask
    randomize_shell: int | None = None
    randomize_A: float | None = None
    resolution_unmasked_A: float = float("nan")
    resolution_masked_A: float | None = None
    resolution_corrected_A: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def resolution_A(self) -> float:
        """The resolution to report: the corrected one with a mask, else the unmasked one."""
        if self.corrected is not None and self.resolution_corrected_A is not None:  # set together
            return self.resolution_corrected_A
        return self.resolution_unmasked_A

    def to_dict(self) -> dict:
        """JSON-ready curves and numbers."""
        arr = {k: (None if getattr(self, k) is None else [float(x) for x in getattr(self, k)])
               for k in ("frequency", "unmasked", "masked", "randomized", "corrected")}
        return {**arr, "randomize_shell": self.randomize_shell, "randomize_A": self.randomize_A,
                "resolution_unmasked_A": self.resolution_unmasked_A, "resolution_masked_A": self.resolution_masked_A,
                "resolution_corrected_A": self.resolution_corrected_A, "resolution_A": self.resolution_A,
                "warnings": list(self.warnings)}


def masked_fsc(half1: np.ndarray | torch.Tensor, half2: np.ndarray | torch.Tensor, mask: np.ndarray | None,
               apix: float, randomize_fsc_at: float = RANDOMIZE_FSC_AT, seed: int = 0,
               device: torch.device | str | None = None) -> MaskedFSC:
    """Unmasked FSC and, with a mask, the masked FSC corrected for the mask by phase randomisation (RELION's
    post-processing): phases randomised beyond the first shell where the unmasked FSC < `randomize_fsc_at`,
    FSC_true = (FSC_masked − FSC_rand)/(1 − FSC_rand) from two shells beyond it. Computed in float64 on `device`;
    the random phases come from a CPU generator seeded with `seed`, so they do not depend on the device."""
    h1 = torch.as_tensor(np.asarray(half1), dtype=torch.float64, device=device)
    h2 = torch.as_tensor(np.asarray(half2), dtype=torch.float64, device=device)
    n = h1.shape[-1]
    if h1.shape != (n, n, n) or h2.shape != h1.shape:
        raise InputError(f"half maps must be cubic and of one size; got {tuple(h1.shape)} and {tuple(h2.shape)}")
    freq = np.arange(n // 2 + 1) / (n * apix)
    unmasked = fsc_batch(h1[None], h2[None])[0].cpu().numpy()
    out = MaskedFSC(freq, unmasked, resolution_unmasked_A=resolution_at(unmasked, n, apix))
    if mask is None:
        return out
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float64, device=h1.device)
    if m.shape != h1.shape:
        raise InputError(f"mask is {tuple(m.shape)} but the half maps are {tuple(h1.shape)}")
    out.masked = _dc_one(fsc_batch((h1 * m)[None], (h2 * m)[None])[0].cpu().numpy())
    out.resolution_masked_A = resolution_at(out.masked, n, apix)
    below = np.nonzero(unmasked[1:] < randomize_fsc_at)[0]
    if not len(below):  # RELION stops here; we keep the masked FSC, uncorrected, and say so
        out.warnings.append(f"the unmasked FSC never drops below {randomize_fsc_at}: no phase randomisation, the "
                            "masked FSC is reported uncorrected")
        out.corrected = out.masked.copy()
        out.resolution_corrected_A = out.resolution_masked_A
        return out
    shell = int(below[0]) + 1
    gen = torch.Generator().manual_seed(int(seed))
    r1 = randomize_phases(h1, shell, gen)
    r2 = randomize_phases(h2, shell, gen)
    rand = _dc_one(fsc_batch((r1 * m)[None], (r2 * m)[None])[0].cpu().numpy())
    corrected = out.masked.copy()
    hi = np.arange(len(corrected)) >= shell + 2
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (out.masked - rand) / (1.0 - rand)
    corrected[hi] = np.where(rand[hi] < 1.0, corr[hi], 0.0)
    out.randomized, out.corrected, out.randomize_shell = rand, corrected, shell
    out.randomize_A = float(n * apix / shell)
    out.resolution_corrected_A = resolution_at(corrected, n, apix)
    k = _last_above(corrected)
    if out.resolution_corrected_A > out.resolution_unmasked_A + 1e-9:
        out.warnings.append("the unmasked FSC extends beyond the corrected masked FSC: the mask may be too tight")
    elif rand[k] > 0.1:
        out.warnings.append(f"the phase-randomised FSC is {rand[k]:.2f} (> 0.10) at the resolution: use a softer "
                            "mask")
    return out


def _dc_one(curve: np.ndarray) -> np.ndarray:
    """RELION's guard: the one-voxel DC shell of masked maps may come out ≤ 0 (opposite mean signs); count it as 1."""
    if curve[0] <= 0:
        curve[0] = 1.0
    return curve


def _last_above(curve: np.ndarray, threshold: float = FSC_THRESHOLD) -> int:
    below = np.nonzero(curve[1:] < threshold)[0]
    return int(below[0]) if len(below) else len(curve) - 1


# ------------------------------------------------------------------------------------------------ local resolution
WINDOW_SIZES = (16, 20, 24, 32, 40, 48)  # default window sides: even, with FFT-friendly factors (2, 3, 5)


def _window_defaults(n: int, window_px: int | None, step_px: int | None) -> tuple[int, int]:
    """Window side (even, ≤ n) and grid step: the largest of WINDOW_SIZES not above a third of the box (16 at
    least), and a fifth of the window but at most n/16 (small boxes, where windows are cheap, get a denser grid)."""
    if window_px is None:
        w = max([c for c in WINDOW_SIZES if c <= n / 3] or [WINDOW_SIZES[0]])
    else:
        w = window_px
    w = min(w + (w % 2), n - (n % 2))
    s = step_px if step_px is not None else max(1, min(w // 5, n // 16))
    return w, s


def local_resolution(half1: np.ndarray, half2: np.ndarray, apix: float, mask: np.ndarray | None = None,
                     window_px: int | None = None, step_px: int | None = None,
                     threshold: float = LOCRES_THRESHOLD, batch: int | None = None,
                     device: torch.device | str | None = None) -> tuple[np.ndarray, dict]:
    """Local resolution map (Å, same box as the half maps) from windowed half-map FSCs.

    The window is a cube of `window_px` (even) holding a sphere of radius window/2 − window/8 with a cosine edge
    window/8 wide; its centres lie on a grid of `step_px` pixels, kept where `mask` > 0.5 (or everywhere). Each
    window's resolution is where its FSC first drops below `threshold`, clipped to [Nyquist, window·apix]; a voxel
    gets the window-weighted mean of 1/resolution of the windows that cover it. Voxels no window reaches (or with
    mask ≤ 0.5) are 0. `batch` windows go through the FFT at once (default: about 2·10⁷ voxels). Returns the map and
    the settings used."""
    h1 = torch.as_tensor(np.asarray(half1), dtype=torch.float32, device=device)
    h2 = torch.as_tensor(np.asarray(half2), dtype=torch.float32, device=device)
    n = h1.shape[-1]
    if h1.shape != (n, n, n) or h2.shape != h1.shape:
        raise InputError(f"half maps must be cubic and of one size; got {tuple(h1.shape)} and {tuple(h2.shape)}")
    w, step = _window_defaults(n, window_px, step_px)
    if w < 8 or step < 1:
        raise InputError(f"the local-resolution window must be at least 8 px and the step at least 1 px; got "
                         f"window {w}, step {step}")
    edge = w / 8
    win = spherical_mask(w, w / 2 - edge, edge, center=((w - 1) / 2,) * 3, device=h1.device)
    # window corners c0 + j·step (j = 0..G-1), all inside the box, centres (corner + w/2) on a grid through n//2
    c0 = (n // 2 - w // 2) % step
    g = (n - w - c0) // step + 1
    centres = c0 + w // 2 + step * np.arange(g)
    keep = np.ones((g, g, g), bool)
    m = None
    if mask is not None:
        m = np.asarray(mask, np.float32)
        if m.shape != tuple(h1.shape):
            raise InputError(f"mask is {m.shape} but the half maps are {tuple(h1.shape)}")
        keep = m[np.ix_(centres, centres, centres)] > 0.5
    sel = torch.as_tensor(np.argwhere(keep), device=h1.device)
    cubes1 = h1[c0:, c0:, c0:].unfold(0, w, step).unfold(1, w, step).unfold(2, w, step)  # (g, g, g, w, w, w) view
    cubes2 = h2[c0:, c0:, c0:].unfold(0, w, step).unfold(1, w, step).unfold(2, w, step)
    res_all = np.zeros(len(sel))
    batch = batch or max(16, int(2e7 // w ** 3))
    for s in range(0, len(sel), batch):
        j = sel[s:s + batch]
        a = cubes1[j[:, 0], j[:, 1], j[:, 2]] * win
        b = cubes2[j[:, 0], j[:, 1], j[:, 2]] * win
        res = np.clip(resolutions_at(fsc_batch(a, b).cpu().numpy(), w, apix, threshold), 2.0 * apix, w * apix)
        res_all[s:s + len(j)] = res
    # each voxel: window-weighted mean of 1/resolution over the windows covering it. With the values as deltas at
    # the window centres, both sums are circular convolutions with the window (no wrap: every window is inside)
    ctr = torch.as_tensor(centres, device=h1.device)
    at = (ctr[sel[:, 0]], ctr[sel[:, 1]], ctr[sel[:, 2]])
    deltas = torch.zeros((2, n, n, n), dtype=torch.float64, device=h1.device)
    deltas[0][at] = torch.as_tensor(1.0 / res_all, dtype=torch.float64, device=h1.device)
    deltas[1][at] = 1.0
    kernel = torch.zeros((n, n, n), dtype=torch.float64, device=h1.device)
    kernel[:w, :w, :w] = win.double()
    kernel = torch.roll(kernel, shifts=(-(w // 2),) * 3, dims=(0, 1, 2))
    sums = torch.fft.irfftn(torch.fft.rfftn(deltas, dim=(-3, -2, -1)) * torch.fft.rfftn(kernel), s=(n, n, n),
                            dim=(-3, -2, -1))
    full_num, full_den = sums[0], sums[1]
    covered = (full_den > 1e-3) & (full_num > 1e-9)
    out = torch.where(covered, full_den / torch.where(covered, full_num, torch.ones_like(full_num)),
                      torch.zeros_like(full_num)).cpu().numpy()
    if m is not None:
        out = np.where(m > 0.5, out, 0.0)
    out = out.astype(np.float32)
    info = {"window_px": w, "window_A": w * apix, "sphere_radius_px": w / 2 - edge, "edge_px": edge,
            "step_px": step, "threshold": threshold, "windows": len(res_all),
            "median_A": float(np.median(res_all)) if len(res_all) else None}
    return out, info


# ------------------------------------------------------------------------------------------------ outputs
STAR_LABELS = (("rlnSpectralIndex", None), ("rlnResolution", None), ("rlnAngstromResolution", None),
               ("rlnFourierShellCorrelationCorrected", "corrected"),
               ("rlnFourierShellCorrelationUnmaskedMaps", "unmasked"),
               ("rlnFourierShellCorrelationMaskedMaps", "masked"),
               ("rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps", "randomized"))


def write_fsc_star(path: str | os.PathLike, f: MaskedFSC) -> None:
    """The curves as a RELION post-process `data_fsc` table (labels as relion_postprocess writes them; without a
    mask the corrected column is the unmasked FSC and the masked ones are absent)."""
    n = len(f.frequency)
    cols = {"rlnSpectralIndex": np.arange(n), "rlnResolution": f.frequency,
            "rlnAngstromResolution": np.where(f.frequency > 0, 1.0 / np.where(f.frequency > 0, f.frequency, 1), 999.0)}
    for label, attr in STAR_LABELS[3:]:
        v = f.unmasked if attr == "corrected" and f.corrected is None else getattr(f, attr)
        if v is not None:
            cols[label] = v
    lines = ["", "# version 30001", "", "data_fsc", "", "loop_"]
    lines += [f"_{k} #{i + 1}" for i, k in enumerate(cols)]
    for i in range(n):
        lines.append(" ".join(str(int(v[i])) if k == "rlnSpectralIndex" else f"{float(v[i]):.6f}"
                              for k, v in cols.items()))
    write_text(path, "\n".join(lines) + "\n\n")


def write_resolution_outputs(out_dir: str | os.PathLike, halves: dict[str, tuple[np.ndarray, np.ndarray]],
                             mask: np.ndarray | None, apix: float, gain: tuple[str, str] | None = ("noflex", "flex"),
                             plot_gain: Callable[..., str] | None = None, plot_fsc: Callable[..., str] | None = None,
                             window_px: int | None = None,
                             step_px: int | None = None, seed: int = 0,
                             device: torch.device | str | None = None) -> dict:
    """Masked, phase-randomisation-corrected FSC and local resolution of each named pair of half maps, and the
    local resolution gain (`gain` = (baseline, improved): baseline − improved, Å), written to `out_dir`:
    fsc_masked_<name>.star, locres_<name>.mrc, locres_gain.mrc and resolution.json (also returned), with
    locres_gain.png drawn by `plot_gain` (engine/plots.plot_resolution_gain) and fsc_masked.png by `plot_fsc`
    (engine/plots.plot_masked_fsc) when given; without them no plot is drawn.

    Without a mask the FSCs are unmasked and the local resolution and gain are taken inside an automatic mask
    around the maps' density (`auto_mask`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not halves:
        raise InputError("no half maps to measure")
    n = next(iter(halves.values()))[0].shape[-1]
    for name, (a, b) in halves.items():
        if np.shape(a) != (n, n, n) or np.shape(b) != (n, n, n):
            raise InputError(f"the {name} half maps are {np.shape(a)} and {np.shape(b)}; expected ({n}, {n}, {n})")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InputError(f"the {name} half maps hold NaN or Inf values")
    if mask is not None and np.shape(mask) != (n, n, n):
        raise InputError(f"mask is {np.shape(mask)} but the half maps are ({n}, {n}, {n})")
    region = np.asarray(mask, np.float32) if mask is not None else auto_mask(
        [0.5 * (a + b) for a, b in halves.values()], apix)
    info: dict = {"apix": apix, "box": n, "masked": mask is not None,
                  "region": "the FSC mask > 0.5" if mask is not None else "an automatic mask around the density",
                  "region_voxels": int((region > 0.5).sum()), "randomize_fsc_at": RANDOMIZE_FSC_AT,
                  "fsc_threshold": FSC_THRESHOLD, "fsc": {}, "locres": {}}
    maps = {}
    for name, (a, b) in halves.items():
        f = masked_fsc(a, b, mask, apix, seed=seed, device=device)
        write_fsc_star(out / f"fsc_masked_{name}.star", f)
        info["fsc"][name] = f.to_dict()
        loc, linfo = local_resolution(a, b, apix, region, window_px, step_px, device=device)
        write_volume(out / f"locres_{name}.mrc", loc, apix)
        inside = loc[region > 0.5]
        inside = inside[inside > 0]
        linfo.update(file=f"locres_{name}.mrc", median_in_region_A=float(np.median(inside)) if len(inside) else None)
        info["locres"][name] = linfo
        maps[name] = loc
    if gain is not None and all(g in maps for g in gain):
        base, better = maps[gain[0]], maps[gain[1]]
        valid = (region > 0.5) & (base > 0) & (better > 0)
        g = np.where(valid, base - better, 0.0).astype(np.float32)
        write_volume(out / "locres_gain.mrc", g, apix)
        vals = g[valid]
        info["gain"] = {"baseline": gain[0], "improved": gain[1], "file": "locres_gain.mrc",
                        "median_A": float(np.median(vals)) if len(vals) else None,
                        "mean_A": float(vals.mean()) if len(vals) else None,
                        "fraction_improved": float((vals > 0).mean()) if len(vals) else None,
                        "max_A": float(vals.max()) if len(vals) else None,
                        "min_A": float(vals.min()) if len(vals) else None}
        if plot_gain is not None:
            save_plot(plot_gain, out / "locres_gain.png", g, base, better, region > 0.5,
                      labels=(gain[0], gain[1]), apix=apix)
            info["gain"]["plot"] = "locres_gain.png"
    if plot_fsc is not None:
        save_plot(plot_fsc, out / "fsc_masked.png", info["fsc"], apix)
        info["fsc_plot"] = "fsc_masked.png"
    write_json(out / "resolution.json", info)
    return info
