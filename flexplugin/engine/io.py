"""RELION STAR particles and MRC images/volumes, read lazily, with a stable id per particle.

Particle files follow RELION 3.1 (a `data_optics` block and a `data_particles` block); RELION 3.0 files
(one table, shifts in pixels, pixel size from `rlnDetectorPixelSize`/`rlnMagnification`) are read too.
Each particle's id is `rlnImageId` (a standard RELION label) when present, otherwise its 1-based row;
results are written back keyed by that id. Stacks are memory-mapped: only requested images are read.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from .atomic import atomic_path
from .ctf import CTFParams
from .errors import InputError
from .geometry import euler_to_matrix

__all__ = ["ParticleSet", "read_particles", "write_particles_star", "read_volume", "write_volume",
           "read_mask", "check_volume_matches", "ID_LABEL", "split_image_name"]

ID_LABEL = "rlnImageId"
POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_LABELS = ("rlnDefocusU", "rlnDefocusV")
OPTICS_DEFAULTS = {"rlnAmplitudeContrast": 0.1, "rlnSphericalAberration": 2.7, "rlnVoltage": 300.0}


def split_image_name(name: str) -> tuple[int, str]:
    """'12@stack.mrcs' → (12, 'stack.mrcs') with the 1-based index RELION uses."""
    if "@" not in name:
        return 1, name
    i, path = name.split("@", 1)
    return int(i), path


class _StackCache:
    """Opens each MRC stack once, memory-mapped, and keeps it open."""

    def __init__(self):
        self._open: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        arr = self._open.get(path)
        if arr is None:
            if not os.path.exists(path):
                raise InputError(f"image stack not found: {path} (check rlnImageName paths; they are "
                                 "relative to the STAR file's folder or to the current directory)")
            try:
                m = mrcfile.mmap(path, mode="r", permissive=True)
            except Exception as e:  # noqa: BLE001 - any read failure is a bad input
                raise InputError(f"cannot read image stack {path}: {e}") from e
            if m.data is None:
                raise InputError(f"cannot read image stack {path}: not an MRC file")
            arr = m.data if m.data.ndim == 3 else m.data[None]
            self._open[path] = arr
        return arr


@dataclass
class ParticleSet:
    """Particles of one STAR file: metadata table, pixel size and box, lazy image access by row."""

    table: pd.DataFrame  # one row per particle, optics columns merged in
    optics: pd.DataFrame
    apix: float
    box: int
    star_path: str = ""
    phase_flipped: bool = False
    _stacks: _StackCache = field(default_factory=_StackCache, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> np.ndarray:
        return self.table[ID_LABEL].to_numpy(np.int64)

    @property
    def has_poses(self) -> bool:
        return all(c in self.table for c in POSE_LABELS)

    @property
    def has_ctf(self) -> bool:
        return all(c in self.table for c in CTF_LABELS)

    def require(self, poses: bool = True, ctf: bool = True) -> None:
        """Raise a clear error if poses or CTF are missing (call before any heavy work)."""
        if poses and not self.has_poses:
            raise InputError(f"{self.star_path}: particles have no 3D alignment ({', '.join(POSE_LABELS)} "
                             "missing). Run a 3D refinement (RELION Refine3D, cryoSPARC homogeneous "
                             "refinement) first and use its particles.")
        if ctf and not self.has_ctf:
            raise InputError(f"{self.star_path}: particles have no CTF ({', '.join(CTF_LABELS)} missing). "
                             "Estimate the CTF (CTFFIND, Gctf) before extraction.")

    def _paths(self, rows: np.ndarray) -> list[tuple[int, str]]:
        return [split_image_name(s) for s in self.table["rlnImageName"].to_numpy()[rows]]

    def images(self, rows: np.ndarray | list[int] | slice, check_finite: bool = True) -> np.ndarray:
        """Images (B, box, box) float32 for table rows `rows` (0-based), read from memory-mapped stacks."""
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.box, self.box), dtype=np.float32)
        for j, (idx, path) in enumerate(self._paths(rows)):
            stack = self._stacks.get(path)
            if not 1 <= idx <= stack.shape[0]:
                raise InputError(f"particle id {self.ids[rows[j]]}: image {idx}@{path} is beyond the end "
                                 f"of the stack ({stack.shape[0]} images)")
            if stack.shape[-1] != self.box or stack.shape[-2] != self.box:
                raise InputError(f"{path}: images are {stack.shape[-1]}x{stack.shape[-2]} but the optics "
                                 f"group says box {self.box}")
            out[j] = stack[idx - 1]
        if check_finite and not np.isfinite(out).all():
            bad = rows[~np.isfinite(out).reshape(len(rows), -1).all(1)]
            raise InputError(f"NaN or Inf values in images of particle ids {self.ids[bad][:10].tolist()}; "
                             "re-extract these particles or remove them from the set")
        return out

    def check_stacks(self) -> None:
        """Open every referenced stack and check all indices are in range (cheap: headers only)."""
        idx_path = self._paths(np.arange(len(self)))
        per_path: dict[str, int] = {}
        for i, p in idx_path:
            per_path[p] = max(per_path.get(p, 0), i)
        for p, mx in per_path.items():
            stack = self._stacks.get(p)
            if mx > stack.shape[0]:
                raise InputError(f"{p} has {stack.shape[0]} images but the STAR file asks for image {mx}")
            if stack.shape[-1] != self.box:
                raise InputError(f"{p}: images are {stack.shape[-1]} px wide, the optics group says {self.box}")

    def rotations(self, rows, device=None) -> torch.Tensor:
        """RELION rotation matrices (B, 3, 3) float32."""
        t = self.table.iloc[rows]
        a = [torch.tensor(t[c].to_numpy(np.float64)) for c in POSE_LABELS]
        return euler_to_matrix(*a).to(torch.float32).to(device)

    def shifts_px(self, rows, device=None) -> torch.Tensor:
        """Origin shifts (B, 2) in pixels (rlnOriginX/YAngst / pixel size)."""
        t = self.table.iloc[rows]
        sx = t["rlnOriginXAngst"].to_numpy(np.float64) / self.apix
        sy = t["rlnOriginYAngst"].to_numpy(np.float64) / self.apix
        return torch.as_tensor(np.stack([sx, sy], 1), dtype=torch.float32, device=device)

    def ctf_params(self, rows, device=None) -> CTFParams:
        t = self.table.iloc[rows]

        def col(name, default=0.0):
            v = t[name].to_numpy(np.float64) if name in t else np.full(len(t), default)
            return torch.tensor(v, dtype=torch.float32, device=device)
        return CTFParams(col("rlnDefocusU"), col("rlnDefocusV"), col("rlnDefocusAngle"), col("rlnVoltage"),
                         col("rlnSphericalAberration"), col("rlnAmplitudeContrast"), col("rlnPhaseShift"),
                         col("rlnCtfBfactor"))

    def half_sets(self, seed: int = 0) -> np.ndarray:
        """Half-set label 1 or 2 per row: `rlnRandomSubset` when present, else a seeded random split."""
        if "rlnRandomSubset" in self.table:
            h = self.table["rlnRandomSubset"].to_numpy(np.int64)
            if set(np.unique(h)) <= {1, 2} and len(np.unique(h)) == 2:
                return h
        rng = np.random.default_rng(seed)
        h = np.ones(len(self), dtype=np.int64)
        h[rng.permutation(len(self))[: len(self) // 2]] = 2
        return h

    def subset(self, rows: np.ndarray) -> "ParticleSet":
        return ParticleSet(self.table.iloc[rows].reset_index(drop=True), self.optics, self.apix, self.box,
                           self.star_path, self.phase_flipped, self._stacks)


def _resolve_image_names(names: pd.Series, star_dir: Path) -> pd.Series:
    """Make stack paths absolute: relative to the STAR folder if they exist there, else to the cwd."""
    cache: dict[str, str] = {}

    def fix(s: str) -> str:
        i, p = split_image_name(s)
        if p not in cache:
            cand = star_dir / p
            cache[p] = str(cand.resolve()) if cand.exists() or not os.path.exists(p) else str(Path(p).resolve())
        return f"{i}@{cache[p]}"
    return names.astype(str).map(fix)


def read_particles(star_path: str | os.PathLike, apix: float | None = None) -> ParticleSet:
    """Read a RELION 3.0/3.1+ particle STAR file (images stay on disk)."""
    star_path = Path(star_path)
    if not star_path.exists():
        raise InputError(f"particle STAR file not found: {star_path}")
    try:
        blocks = starfile.read(star_path, always_dict=True)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot parse STAR file {star_path}: {e}") from e
    parts = blocks.get("particles")
    optics = blocks.get("optics")
    if parts is None:  # RELION 3.0: a single unnamed/other block
        tables = [v for v in blocks.values() if isinstance(v, pd.DataFrame) and "rlnImageName" in v]
        if not tables:
            raise InputError(f"{star_path}: no particle table with rlnImageName")
        parts = tables[0]
    parts = parts.copy()
    if len(parts) == 0:
        raise InputError(f"{star_path}: the particle table is empty")
    if "rlnImageName" not in parts:
        raise InputError(f"{star_path}: particles have no rlnImageName column")
    if optics is None:  # legacy: build one optics group from particle columns
        row = {k: float(parts[k].iloc[0]) for k in OPTICS_DEFAULTS if k in parts}
        row["rlnOpticsGroup"] = 1
        if apix is None and "rlnDetectorPixelSize" in parts and "rlnMagnification" in parts:
            apix = float(parts["rlnDetectorPixelSize"].iloc[0]) * 1e4 / float(parts["rlnMagnification"].iloc[0])
        if apix is None and "rlnImagePixelSize" in parts:
            apix = float(parts["rlnImagePixelSize"].iloc[0])
        if apix is None:
            raise InputError(f"{star_path}: RELION 3.0 file without pixel size; pass --apix")
        row["rlnImagePixelSize"] = apix
        optics = pd.DataFrame([row])
        parts["rlnOpticsGroup"] = 1
        for ax in ("X", "Y"):
            if f"rlnOrigin{ax}" in parts and f"rlnOrigin{ax}Angst" not in parts:
                parts[f"rlnOrigin{ax}Angst"] = parts[f"rlnOrigin{ax}"].astype(float) * apix
    optics = optics.copy()
    if "rlnOpticsGroup" not in parts:
        parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    psize_col = "rlnImagePixelSize" if "rlnImagePixelSize" in optics else None
    if apix is None:
        if psize_col is None:
            raise InputError(f"{star_path}: optics table has no rlnImagePixelSize; pass --apix")
        ps = optics[psize_col].astype(float).unique()
        if len(ps) > 1 and not np.allclose(ps, ps[0], rtol=1e-4):
            raise InputError(f"{star_path}: optics groups have different pixel sizes {ps.tolist()}; "
                             "rescale particles to one pixel size first")
        apix = float(ps[0])
    if apix <= 0:
        raise InputError(f"{star_path}: pixel size must be positive, got {apix}")
    merge_cols = [c for c in optics.columns if c not in parts.columns or c == "rlnOpticsGroup"]
    table = parts.merge(optics[merge_cols], on="rlnOpticsGroup", how="left")
    defaults_used = []
    for k, v in OPTICS_DEFAULTS.items():
        if k not in table:
            table[k] = v
            defaults_used.append(f"{k}={v}")
    if defaults_used:  # RELION itself would assume 0/0/200 kV: say what we assumed, loudly
        warnings.warn(f"{star_path}: no {', '.join(d.split('=')[0] for d in defaults_used)}; assuming "
                      f"{', '.join(defaults_used)}. Add the columns to the optics table if these are wrong.",
                      stacklevel=2)
    for ax in ("X", "Y"):
        if f"rlnOrigin{ax}Angst" not in table:
            table[f"rlnOrigin{ax}Angst"] = 0.0
    if ID_LABEL not in table:
        table[ID_LABEL] = np.arange(1, len(table) + 1)
    if table[ID_LABEL].duplicated().any():
        raise InputError(f"{star_path}: {ID_LABEL} values are not unique")
    table["rlnImageName"] = _resolve_image_names(table["rlnImageName"], star_path.parent)
    box = None
    if "rlnImageSize" in optics:
        sizes = optics["rlnImageSize"].astype(int).unique()
        if len(sizes) > 1:
            raise InputError(f"{star_path}: optics groups have different box sizes {sizes.tolist()}")
        box = int(sizes[0])
    cache = _StackCache()
    first = split_image_name(table["rlnImageName"].iloc[0])[1]
    stack_box = int(cache.get(first).shape[-1])
    if box is None:
        box = stack_box
    elif box != stack_box:
        raise InputError(f"{star_path}: rlnImageSize is {box} but {first} holds {stack_box}-px images")
    flipped = bool(int(optics["rlnCtfDataArePhaseFlipped"].iloc[0])) if "rlnCtfDataArePhaseFlipped" in optics else False
    numeric = [c for c in table.columns if c != "rlnImageName" and table[c].dtype == object]
    for c in numeric:
        conv = pd.to_numeric(table[c], errors="coerce")
        if conv.notna().all():
            table[c] = conv
    return ParticleSet(table.reset_index(drop=True), optics, apix, box, str(star_path), flipped, cache)


def write_particles_star(path: str | os.PathLike, particles: pd.DataFrame, optics: pd.DataFrame) -> None:
    """Write a RELION 3.1 STAR file (data_optics + data_particles), atomically; columns are written as given."""
    parts = particles.copy()
    optic_cols = [c for c in optics.columns if c != "rlnOpticsGroup"]
    parts = parts.drop(columns=[c for c in optic_cols if c in parts.columns])
    with atomic_path(path) as tmp:
        starfile.write({"optics": optics, "particles": parts}, tmp, overwrite=True)


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(volume float32 [z, y, x], pixel size Å) from an MRC file; refuses non-cubic volumes."""
    if not os.path.exists(path):
        raise InputError(f"volume not found: {path}")
    try:
        with mrcfile.open(path, mode="r", permissive=True) as m:
            data = np.asarray(m.data, dtype=np.float32).copy()
            apix = float(m.voxel_size.x)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read volume {path}: {e}") from e
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"{path}: volume must be cubic, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: volume contains NaN or Inf values")
    return data, apix


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A mask volume, checked to lie in [0, 1] and to be non-empty."""
    m, apix = read_volume(path)
    if m.min() < -1e-3 or m.max() > 1 + 1e-3:
        raise InputError(f"{path}: mask values must lie in [0, 1] (got {m.min():.3g}..{m.max():.3g})")
    if m.max() <= 0:
        raise InputError(f"{path}: mask is empty")
    return np.clip(m, 0, 1), apix


def check_volume_matches(name: str, shape: tuple, vol_apix: float, box: int, apix: float) -> None:
    """Raise a clear error if a volume's box or pixel size differs from the particles'."""
    if shape[-1] != box:
        raise InputError(f"{name} is {shape[-1]} voxels wide but particles are {box} px; "
                         "resize one of them so the boxes match")
    if vol_apix > 0 and abs(vol_apix - apix) > 1e-3 * apix:
        raise InputError(f"{name} has pixel size {vol_apix:.4f} Å but particles have {apix:.4f} Å; "
                         "resample one of them so the pixel sizes match")


def write_volume(path: str | os.PathLike, vol: np.ndarray | torch.Tensor, apix: float) -> None:
    """Write a float32 MRC volume (or image stack) with its pixel size; atomic (temp file + rename)."""
    if isinstance(vol, torch.Tensor):
        vol = vol.detach().cpu().numpy()
    vol = np.ascontiguousarray(vol, dtype=np.float32)
    with atomic_path(path) as tmp, mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = apix
        if vol.ndim == 3 and str(path).endswith(".mrcs"):
            m.set_image_stack()
