"""RELION STAR particles and MRC images/volumes, read lazily, with a stable id per particle.

Particle files follow RELION 3.1 (a `data_optics` block and a `data_particles` block); RELION 3.0 files
(one table, shifts in pixels, pixel size from `rlnDetectorPixelSize`/`rlnMagnification`) are read too.
Each particle's id is `rlnImageId` (a standard RELION label) when present, otherwise its 1-based row;
results are written back keyed by that id. Stacks are memory-mapped: only requested images are read.

Every value a command uses is checked once, here, when the file is read (COLUMN_RULES): a text, NaN or
out-of-range cell, a row shorter than its header, a bad image number or an optics group the optics table lacks
is an InputError naming the file, the column and the first bad row, before any command starts work.
"""
from __future__ import annotations

import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import starfile
import torch

from .atomic import atomic_path
from .cryosparc_cs import is_cs_file, read_cs_blocks
from .ctf import CTFParams
from .errors import InputError
from .geometry import euler_to_matrix
from .latents import ID_LABEL

__all__ = ["COLUMN_RULES", "ID_LABEL", "ParticleSet", "check_volume_matches", "read_mask", "read_particles",
           "read_segmentation", "read_volume", "split_image_name", "write_particles_star", "write_volume"]

POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
CTF_LABELS = ("rlnDefocusU", "rlnDefocusV")
OPTICS_DEFAULTS = {"rlnAmplitudeContrast": 0.1, "rlnSphericalAberration": 2.7, "rlnVoltage": 300.0}

# What each known STAR column must hold: (rule, what the value is). read_particles checks every such column once,
# so a text, NaN or out-of-range cell is an InputError naming the file, table, column and first bad row before
# any command starts work (a single NaN defocus or voltage would otherwise turn the whole map into zeros).
COLUMN_RULES: dict[str, tuple[str, str]] = {
    ID_LABEL: ("integer", "a particle id"),
    "rlnOpticsGroup": ("integer", "an optics group number"),
    "rlnAngleRot": ("finite", "an Euler angle in degrees"),
    "rlnAngleTilt": ("finite", "an Euler angle in degrees"),
    "rlnAnglePsi": ("finite", "an Euler angle in degrees"),
    "rlnOriginX": ("finite", "a shift in pixels"),
    "rlnOriginY": ("finite", "a shift in pixels"),
    "rlnOriginXAngst": ("finite", "a shift in Å"),
    "rlnOriginYAngst": ("finite", "a shift in Å"),
    "rlnDefocusU": ("positive", "a defocus in Å (positive = underfocus)"),
    "rlnDefocusV": ("positive", "a defocus in Å (positive = underfocus)"),
    "rlnDefocusAngle": ("finite", "an astigmatism angle in degrees"),
    "rlnPhaseShift": ("finite", "a phase shift in degrees"),
    "rlnCtfBfactor": ("finite", "a CTF B-factor in Å²"),
    "rlnCtfScalefactor": ("finite", "a CTF scale factor"),
    "rlnGroupScaleCorrection": ("finite", "a scale factor"),
    "rlnVoltage": ("positive", "the acceleration voltage in kV"),
    "rlnSphericalAberration": ("finite", "the spherical aberration in mm"),
    "rlnAmplitudeContrast": ("fraction", "the amplitude contrast as a fraction"),
    "rlnImagePixelSize": ("positive", "the pixel size in Å"),
    "rlnDetectorPixelSize": ("positive", "the detector pixel size in µm"),
    "rlnMagnification": ("positive", "the magnification"),
    "rlnImageSize": ("count", "the box size in pixels"),
    "rlnRandomSubset": ("integer", "a half-set number (1 or 2)"),
    "rlnCtfDataArePhaseFlipped": ("flag", "whether the images are phase-flipped"),
}
_RULE_TEXT = {"finite": "a finite number", "positive": "a positive number", "integer": "a whole number",
              "count": "a whole number >= 1", "fraction": "a number from 0 to below 1", "flag": "0 or 1"}


def split_image_name(name: str) -> tuple[int, str]:
    """'12@stack.mrcs' → (12, 'stack.mrcs') with the 1-based index RELION uses."""
    if "@" not in name:
        return 1, name
    i, path = name.split("@", 1)
    return int(i), path


def _warn(message: str) -> None:
    """A `WARNING: ...` line in the job's log (stdout, in order with the progress lines)."""
    print(f"WARNING: {message}", flush=True)


def _missing(raw: pd.Series) -> np.ndarray:
    """Cells without a value: NaN/NA, or an empty string (what pandas leaves in a row shorter than its header)."""
    miss = raw.isna().to_numpy().copy()
    if not pd.api.types.is_numeric_dtype(raw):
        miss |= (raw.astype(str).str.strip() == "").to_numpy()
    return miss


def _loop_lines(path: Path) -> Iterator[tuple[str, list[str], int, str]]:
    """(block name, column names, 1-based row, line) for each data line of each loop of a STAR file.

    Read again only when something is wrong, to name a row whose number of values differs from its header."""
    block, in_loop, row = "", False, 0
    cols: list[str] = []
    with open(path, errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            if s.startswith("data_"):
                block, cols, in_loop, row = s[5:], [], False, 0
            elif s.startswith("loop_"):
                cols, in_loop, row = [], True, 0
            elif s.startswith("_"):
                if in_loop and row == 0:
                    cols.append(s.split()[0][1:])
            elif in_loop and cols:
                row += 1
                yield block, cols, row, s


def _count_values(line: str) -> int:
    """Number of values on a STAR data line (quoted values count once, as starfile reads them)."""
    try:
        return len(shlex.split(line.replace("'", '"'), comments=True))
    except ValueError:
        return len(line.split())


def _row_length_error(path: Path, block: str | None = None, rows: set[int] | None = None) -> str | None:
    """A message naming the first data row (of `block`, among 1-based `rows`) whose number of values differs from
    the number of columns of its table; None when every such row is complete."""
    last = max(rows) if rows else None
    for b, cols, row, line in _loop_lines(path):
        if block is not None and b != block:
            continue
        if last is not None and row > last:
            break
        if rows is not None and row not in rows:
            continue
        n = _count_values(line)
        if n != len(cols):
            extra = n - len(cols)
            what = (f"no value for {cols[n]}" + (f" and {-extra - 1} more" if extra < -1 else "") if extra < 0
                    else f"{extra} more value{'s' if extra > 1 else ''} than the header names")
            return (f"{path}: data_{b} row {row} has {n} values but the table has {len(cols)} columns ({what}); "
                    "the line was truncated or edited: fix or remove it")
    return None


def _check_row_lengths(df: pd.DataFrame, path: Path, block: str) -> None:
    """Refuse a row shorter than its header (pandas fills it with NaN or '' without a word)."""
    if df.shape[1] == 0:
        return
    cand = np.flatnonzero(_missing(df.iloc[:, -1]))
    if len(cand):
        msg = _row_length_error(path, block, {int(i) + 1 for i in cand})
        if msg:
            raise InputError(msg)


def _check_columns(df: pd.DataFrame, path: Path, block: str) -> None:
    """Convert the COLUMN_RULES columns of `df` (table `block` of `path`) to numbers, in place; the first cell that
    breaks its rule is an InputError naming the file, column and row (and the particle id or optics group)."""
    label = "rlnOpticsGroup" if block == "optics" else ID_LABEL
    names: np.ndarray | None = None
    for col in [c for c in COLUMN_RULES if c in df.columns]:
        kind, what = COLUMN_RULES[col]
        raw = df[col]
        v = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(v)
            if kind == "positive":
                bad |= v <= 0
            elif kind == "fraction":
                bad |= (v < 0) | (v >= 1)
            elif kind in ("integer", "count", "flag"):
                bad |= v != np.round(v)
                if kind == "count":
                    bad |= v < 1
                if kind == "flag":
                    bad |= (v != 0) & (v != 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            cell = raw.iloc[i]
            if isinstance(cell, str) and not cell.strip():
                desc = "has no value"
            elif isinstance(cell, str) and np.isnan(v[i]) and cell.strip().lower() != "nan":
                desc = f"holds the text {cell.strip()!r}"
            elif np.isnan(v[i]):
                desc = "is NaN"
            else:
                desc = f"is {v[i]:g}"
            where = f"data_{block} row {i + 1}"
            if names is not None:
                where += f" ({'optics group' if block == 'optics' else 'particle id'} {names[i]})"
            more = int(bad.sum()) - 1
            fix = "Fix the optics table" if block == "optics" else "Fix the value or remove the particle from the set"
            raise InputError(f"{path}: {col} {desc} in {where}" + (f" (and {more} more rows)" if more else "")
                             + f"; it must be {_RULE_TEXT[kind]}: {what}. {fix}.")
        if kind in ("integer", "count", "flag"):
            df[col] = raw.to_numpy(np.int64) if pd.api.types.is_integer_dtype(raw) else v.astype(np.int64)
        else:
            df[col] = v
        if col == label:
            names = df[col].to_numpy()


class _StackCache:
    """Opens each MRC stack once, memory-mapped, and keeps it open."""

    def __init__(self) -> None:
        self._open: dict[str, np.ndarray] = {}

    def get(self, path: str) -> np.ndarray:
        arr = self._open.get(path)
        if arr is None:
            if not os.path.exists(path):
                raise InputError(f"image stack not found: {path} (check rlnImageName paths; they are "
                                 "relative to the STAR file's folder or to the current directory)")
            try:
                m = mrcfile.mmap(path, mode="r", permissive=True)
            except Exception as e:
                raise InputError(f"cannot read image stack {path}: {e}") from e
            if m.data is None:
                raise InputError(f"cannot read image stack {path}: not an MRC file")
            _check_real(m.data, path, "image stack")
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

    def subset(self, rows: np.ndarray) -> ParticleSet:
        return ParticleSet(self.table.iloc[rows].reset_index(drop=True), self.optics, self.apix, self.box,
                           self.star_path, self.phase_flipped, self._stacks)


def _resolve_image_names(names: pd.Series, star_path: Path) -> pd.Series:
    """Make stack paths absolute: relative to the STAR folder if they exist there, else to the cwd. A name that is
    not `N@stack` with N a whole number >= 1 (or a bare file name: its first image) is an InputError naming its row."""
    cache: dict[str, str] = {}
    out = []
    for row, s in enumerate(names.tolist()):
        try:
            i, p = split_image_name(s)
        except (TypeError, ValueError):  # not text, or no number before '@'
            i, p = 0, ""
        if i < 1 or not p.strip():
            raise InputError(f"{star_path}: rlnImageName {s!r} in data_particles row {row + 1} is not an image: it "
                             "must be N@stack.mrcs with N the image number, from 1")
        if p not in cache:
            cand = star_path.parent / p
            cache[p] = str(cand.resolve()) if cand.exists() or not os.path.exists(p) else str(Path(p).resolve())
        out.append(f"{i}@{cache[p]}")
    return pd.Series(out, index=names.index, dtype=object)


def read_particles(star_path: str | os.PathLike, apix: float | None = None) -> ParticleSet:
    """Read a RELION 3.0/3.1+ particle STAR file or a cryoSPARC .cs file (images stay on disk), every used value
    checked (COLUMN_RULES).

    `apix` is for RELION 3.0 files that carry no pixel size; one that disagrees with the file's is an error (a
    silent override would mis-scale the shifts in Å and the CTF)."""
    star_path = Path(star_path)
    if is_cs_file(star_path):  # a cryoSPARC .cs file, read as the same RELION 3.1 tables (engine/cryosparc_cs.py)
        blocks = read_cs_blocks(star_path)
    elif not star_path.exists():
        raise InputError(f"particle STAR file not found: {star_path}")
    else:
        try:
            blocks = starfile.read(star_path, always_dict=True)
        except Exception as e:
            raise InputError(_row_length_error(star_path) or f"cannot parse STAR file {star_path}: {e}") from e
    parts, block = blocks.get("particles"), "particles"
    optics = blocks.get("optics")
    if parts is None:  # RELION 3.0: a single unnamed/other block
        tables = [(k, v) for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v]
        if not tables:
            raise InputError(f"{star_path}: no particle table with rlnImageName")
        block, parts = tables[0]
    if not isinstance(parts, pd.DataFrame):
        raise InputError(f"{star_path}: data_{block} is not a table (loop_) of particles")
    parts = parts.copy()
    if len(parts) == 0:
        raise InputError(f"{star_path}: the particle table is empty")
    if "rlnImageName" not in parts:
        raise InputError(f"{star_path}: particles have no rlnImageName column")
    _check_row_lengths(parts, star_path, block)
    _check_columns(parts, star_path, block)
    if isinstance(optics, dict):  # one group written as `_label value` pairs instead of a loop: one row
        optics = pd.DataFrame([optics])
    if optics is not None:
        if not isinstance(optics, pd.DataFrame) or len(optics) == 0:
            raise InputError(f"{star_path}: data_optics holds no optics groups (a loop_ with one row per group)")
        if "rlnOpticsGroup" not in optics:
            raise InputError(f"{star_path}: the optics table has no rlnOpticsGroup column")
        optics = optics.copy()
        _check_row_lengths(optics, star_path, "optics")
        _check_columns(optics, star_path, "optics")
        dup = optics["rlnOpticsGroup"].duplicated()
        if dup.any():
            raise InputError(f"{star_path}: optics group {optics['rlnOpticsGroup'][dup].iloc[0]} is listed more than "
                             "once in data_optics; each group needs one row")
    file_apix, source = None, "rlnImagePixelSize"
    legacy = optics is None
    if optics is None:  # legacy: build one optics group from particle columns
        row = {k: float(parts[k].iloc[0]) for k in OPTICS_DEFAULTS if k in parts}
        row["rlnOpticsGroup"] = 1
        if "rlnDetectorPixelSize" in parts and "rlnMagnification" in parts:
            file_apix = float(parts["rlnDetectorPixelSize"].iloc[0]) * 1e4 / float(parts["rlnMagnification"].iloc[0])
            source = "rlnDetectorPixelSize x 10^4 / rlnMagnification"
        elif "rlnImagePixelSize" in parts:
            file_apix = float(parts["rlnImagePixelSize"].iloc[0])
        optics = pd.DataFrame([row])
        parts["rlnOpticsGroup"] = 1
    elif "rlnImagePixelSize" in optics:
        ps = optics["rlnImagePixelSize"].astype(float).unique()
        if len(ps) > 1 and not np.allclose(ps, ps[0], rtol=1e-4):
            raise InputError(f"{star_path}: optics groups have different pixel sizes {ps.tolist()}; "
                             "rescale particles to one pixel size first")
        file_apix = float(ps[0])
    if apix is not None:
        if not (np.isfinite(apix) and apix > 0):
            raise InputError(f"--apix must be a positive number of Å per pixel, got {apix}")
        if file_apix is not None and abs(apix - file_apix) > 1e-4 * file_apix:
            raise InputError(f"--apix {apix:g} disagrees with the pixel size {file_apix:g} Å of {star_path} "
                             f"({source}); omit --apix (it is for RELION 3.0 files without a pixel size) or "
                             "correct the file")
    elif file_apix is None:
        raise InputError(f"{star_path}: " + ("RELION 3.0 file without pixel size; pass --apix" if legacy
                                             else "optics table has no rlnImagePixelSize; pass --apix"))
    else:
        apix = file_apix
    apix = float(apix)
    optics["rlnImagePixelSize"] = apix
    if legacy:  # RELION 3.0 shifts are in pixels
        for ax in ("X", "Y"):
            if f"rlnOrigin{ax}" in parts and f"rlnOrigin{ax}Angst" not in parts:
                parts[f"rlnOrigin{ax}Angst"] = parts[f"rlnOrigin{ax}"].astype(float) * apix
    if "rlnOpticsGroup" not in parts:
        parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    unknown = ~parts["rlnOpticsGroup"].isin(optics["rlnOpticsGroup"]).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        pid = f" (particle id {parts[ID_LABEL].iloc[i]})" if ID_LABEL in parts else ""
        raise InputError(f"{star_path}: rlnOpticsGroup {parts['rlnOpticsGroup'].iloc[i]} in data_particles row "
                         f"{i + 1}{pid}" + (f" (and {int(unknown.sum()) - 1} more rows)" if unknown.sum() > 1 else "")
                         + " is not in the optics table (groups "
                         + ", ".join(str(g) for g in optics["rlnOpticsGroup"].tolist()[:10])
                         + "); add the group to data_optics or fix the particle's group")
    merge_cols = [c for c in optics.columns if c not in parts.columns or c == "rlnOpticsGroup"]
    table = parts.merge(optics[merge_cols], on="rlnOpticsGroup", how="left")
    defaults_used = []
    for k, v in OPTICS_DEFAULTS.items():
        if k not in table:
            table[k] = v
            defaults_used.append(f"{k}={v}")
    if defaults_used:  # RELION itself would assume 0/0/200 kV: say what we assumed, loudly
        _warn(f"{star_path}: no {', '.join(d.split('=')[0] for d in defaults_used)}; assuming "
              f"{', '.join(defaults_used)}. Add the columns to the optics table if these are wrong.")
    for ax in ("X", "Y"):
        if f"rlnOrigin{ax}Angst" not in table:
            table[f"rlnOrigin{ax}Angst"] = 0.0
    if ID_LABEL not in table:
        table[ID_LABEL] = np.arange(1, len(table) + 1)
    dup = table[ID_LABEL].duplicated()
    if dup.any():
        raise InputError(f"{star_path}: {ID_LABEL} {table[ID_LABEL][dup].iloc[0]} appears more than once "
                         f"(data_particles row {int(np.flatnonzero(dup.to_numpy())[0]) + 1}); "
                         f"{ID_LABEL} values must be unique")
    table["rlnImageName"] = _resolve_image_names(table["rlnImageName"], star_path)
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
    flipped = False
    if "rlnCtfDataArePhaseFlipped" in optics:
        flags = optics["rlnCtfDataArePhaseFlipped"].unique()
        if len(flags) > 1:
            raise InputError(f"{star_path}: some optics groups are phase-flipped (rlnCtfDataArePhaseFlipped 1) and "
                             "some are not; process them as separate sets")
        flipped = bool(flags[0])
    text = [c for c in table.columns if c != "rlnImageName" and not pd.api.types.is_numeric_dtype(table[c])]
    for c in text:  # other columns that hold numbers only (e.g. rlnClassNumber) become numbers
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


def _check_real(data: np.ndarray, path: str | os.PathLike, what: str) -> None:
    """Refuse complex MRC data (modes 3 and 4): converting it to float would silently drop the imaginary part."""
    if np.iscomplexobj(data):
        raise InputError(f"{path}: the {what} holds complex values (MRC mode 4, {data.dtype}); "
                         f"a {what} must be real: write its real-space values (e.g. an inverse FFT) instead")


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(volume float32 [z, y, x], pixel size Å) from an MRC file; refuses non-cubic, complex or non-finite volumes
    and a negative or non-finite voxel size (0, i.e. unset, is returned as 0)."""
    if not os.path.exists(path):
        raise InputError(f"volume not found: {path}")
    try:
        with mrcfile.open(path, mode="r", permissive=True) as m:
            if m.data is None:
                raise InputError(f"cannot read volume {path}: not an MRC file")
            _check_real(m.data, path, "volume")
            data = np.asarray(m.data, dtype=np.float32).copy()
            voxel = m.voxel_size
            sizes = [float(voxel.x), float(voxel.y), float(voxel.z)]
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot read volume {path}: {e}") from e
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"{path}: volume must be cubic, got shape {data.shape}")
    if not all(np.isfinite(sizes)) or min(sizes) < 0:
        raise InputError(f"{path}: the MRC header gives the voxel size {sizes[0]:g} x {sizes[1]:g} x {sizes[2]:g} Å; "
                         "it must be positive: fix the header (e.g. relion_image_handler --angpix, or mrcfile's "
                         "voxel_size)")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: volume contains NaN or Inf values")
    return data, sizes[0]


def read_mask(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A mask volume, checked to lie in [0, 1] and to be non-empty."""
    m, apix = read_volume(path)
    if m.min() < -1e-3 or m.max() > 1 + 1e-3:
        raise InputError(f"{path}: mask values must lie in [0, 1] (got {m.min():.3g}..{m.max():.3g})")
    if m.max() <= 0:
        raise InputError(f"{path}: mask is empty")
    return np.clip(m, 0, 1), apix


def read_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """(labels int64 [z, y, x], pixel size Å) of a segmentation map: a whole number per voxel, 0 = background.

    A density map given by mistake (fractional values) is refused: rounding it would invent segments."""
    seg, apix = read_volume(path)
    frac = np.abs(seg - np.rint(seg)) > 1e-3
    if frac.any():
        z, y, x = (int(c[0]) for c in np.nonzero(frac))
        raise InputError(f"{path}: a segmentation labels each voxel with a whole number (0 = background, 1, 2, ... "
                         f"one per segment), but this map holds {seg[z, y, x]:.4g} at voxel (x {x}, y {y}, z {z}) "
                         f"and {int(frac.sum()) - 1} more fractional values: it looks like a density map; give the "
                         "segmentation (e.g. from Segger or a label map) instead")
    labels = np.rint(seg).astype(np.int64)
    if labels.min() < 0:
        raise InputError(f"{path}: segment labels must be 0 (background) or positive, found {int(labels.min())}")
    return labels, apix


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
