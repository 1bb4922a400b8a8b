"""cryoSPARC `.cs` particle files: read as the engine's RELION tables, and our latents written back by uid.

A `.cs` file is a NumPy structured array, one row per particle (read with cryosparc-tools' `Dataset`, or with
NumPy when that package is absent). `read_cs_blocks` turns it into the `{"optics", "particles"}` tables that
`io.read_particles` gets from a RELION 3.1 STAR file, so every command that takes a STAR file takes a `.cs`:

    blob/path, blob/idx (0-based)      rlnImageName  "<idx+1>@<absolute stack path>"
    blob/psize_A, blob/shape           rlnImagePixelSize, rlnImageSize (optics)
    ctf/df1_A, df2_A, df_angle_rad     rlnDefocusU, rlnDefocusV (Å), rlnDefocusAngle (degrees)
    ctf/accel_kv, cs_mm, amp_contrast  rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast
    ctf/phase_shift_rad, bfactor       rlnPhaseShift (degrees), rlnCtfBfactor
    ctf/exp_group_id                   rlnOpticsGroup (exposure group + 1)
    alignments3D/pose                  rlnAngleRot/Tilt/Psi: RELION's matrix A = R(pose)ᵀ, R the rotation of the
                                       axis-angle vector `pose` (Rodrigues), A read as RELION Euler angles
    alignments3D/shift (pixels)        rlnOriginXAngst/YAngst = shift × pixel size (same sign as rlnOrigin)
    alignments3D/split (0/1)           rlnRandomSubset (1/2)

The pose and shift conventions are checked in tests/reference/test_cryosparc_cs.py against cryoDRGN's own parse of the
same file (its test data `pose.cs.pkl`) and the CTF against the matching STAR file. Particle ids
(`rlnImageId`) are the 1-based rows of the `.cs` file: cryoSPARC's 64-bit uids do not fit the engine's ids, so
`write_cs_latents` maps ids back to rows, hence to uids, when it writes the latents as cryoSPARC 3DVA-style
`components_mode_<k>/component` and `components_mode_<k>/value` fields.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .geometry import matrix_to_euler_np
from .latents import ID_LABEL

__all__ = ["CS_SUFFIX", "is_cs_file", "load_cs", "read_blocks", "read_cs_blocks", "relion_angles", "rotvec_to_matrix", "write_cs_latents",
           "write_cs_latents_beside"]

CS_SUFFIX = ".cs"
LATENTS_CS = "latents.cs"  # beside latents.csv when the particles came from a .cs file
REQUIRED_FIELDS = ("uid", "blob/path", "blob/idx", "blob/psize_A", "blob/shape")
# cryoSPARC field -> (RELION column, factor applied); angles in radians become degrees
CTF_FIELDS = {
    "ctf/df1_A": ("rlnDefocusU", 1.0),
    "ctf/df2_A": ("rlnDefocusV", 1.0),
    "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
    "ctf/accel_kv": ("rlnVoltage", 1.0),
    "ctf/cs_mm": ("rlnSphericalAberration", 1.0),
    "ctf/amp_contrast": ("rlnAmplitudeContrast", 1.0),
    "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
    "ctf/bfactor": ("rlnCtfBfactor", 1.0),
}


def is_cs_file(path: str | os.PathLike) -> bool:
    """Whether a particle file is a cryoSPARC `.cs` file (by its suffix)."""
    return Path(path).suffix.lower() == CS_SUFFIX


def load_cs(path: str | os.PathLike) -> np.ndarray:
    """The `.cs` file as a NumPy structured array (cryosparc-tools' Dataset when installed, else NumPy's loader);
    a missing or unreadable file is an InputError naming it."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"cryoSPARC particle file not found: {p}")
    arr, err = None, None
    try:
        from cryosparc.dataset import Dataset
        arr = Dataset.load(p).to_records(fixed=True)
    except Exception as e:  # noqa: BLE001  (not installed, or a layout it refuses: NumPy may still read it)
        err = e
    if arr is None:
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as e:  # noqa: BLE001  (NumPy's format errors)
            raise InputError(f"cannot read {p} as a cryoSPARC .cs file: {err if err is not None else e}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise InputError(f"{p} is not a cryoSPARC .cs file: it holds no table of named fields")
    if len(arr) == 0:
        raise InputError(f"{p}: the cryoSPARC particle table is empty")
    return arr


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rotation matrices (N, 3, 3) of axis-angle vectors (N, 3) (angle = norm in radians), by Rodrigues' formula."""
    v = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    theta = np.linalg.norm(v, axis=1)
    safe = np.where(theta > 0, theta, 1.0)
    k = v / safe[:, None]
    K = np.zeros((len(v), 3, 3))
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    K[:, 1, 0], K[:, 2, 0], K[:, 2, 1] = k[:, 2], -k[:, 1], k[:, 0]
    s, c = np.sin(theta)[:, None, None], np.cos(theta)[:, None, None]
    return np.eye(3)[None] + s * K + (1.0 - c) * (K @ K)


def relion_angles(pose: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RELION (rot, tilt, psi) in degrees of cryoSPARC axis-angle poses (N, 3): RELION's matrix A = R(pose)ᵀ."""
    return matrix_to_euler_np(rotvec_to_matrix(pose).transpose(0, 2, 1))


def _field(arr: np.ndarray, name: str, path: Path, width: int | None = None) -> np.ndarray:
    """A numeric field as float64, checked finite (and of `width` values per row); an InputError names the
    file, field, row and uid of the first bad value."""
    try:
        v = np.asarray(arr[name], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: field {name} holds {arr[name].dtype} values; it must be numbers") from None
    if width is not None and (v.ndim != 2 or v.shape[1] != width):
        raise InputError(f"{path}: field {name} must hold {width} numbers per particle, it has shape {v.shape}")
    bad = ~np.isfinite(v.reshape(len(v), -1)).all(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(f"{path}: field {name} holds {v[i].tolist()} at row {i} (0-based, uid {arr['uid'][i]})"
                         + (f" and {int(bad.sum()) - 1} more rows" if bad.sum() > 1 else "")
                         + "; it must be finite numbers")
    return v


def _resolve_blob_paths(paths: np.ndarray, path: Path) -> list[str]:
    """Absolute stack paths of `blob/path` values: cryoSPARC writes them relative to its project folder (with a
    leading '>' for imported files); tried beside the .cs file, in its parent (the project when the .cs sits in a
    job folder), then from the cwd. A stack found nowhere is an InputError naming the first such path."""
    cache: dict[str, str] = {}
    out = []
    for i, raw in enumerate(paths.tolist()):
        s = raw.decode() if isinstance(raw, bytes) else str(raw)
        if s not in cache:
            rel = s.lstrip(">")
            if not rel.strip():
                raise InputError(f"{path}: blob/path is empty at row {i} (0-based)")
            cands = [Path(rel)] if Path(rel).is_absolute() else [path.parent / rel, path.parent.parent / rel,
                                                                  Path(rel)]
            found = next((c for c in cands if c.exists()), None)
            if found is None:
                raise InputError(f"{path}: the stack {s!r} of row {i} (0-based) is not found beside the .cs file, in "
                                 f"its parent folder nor from the current folder ({os.getcwd()}); run from the "
                                 "cryoSPARC project folder or copy the stacks")
            cache[s] = str(found.resolve())
        out.append(cache[s])
    return out


def read_cs_blocks(path: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """The `{"optics", "particles"}` RELION 3.1 tables of a cryoSPARC `.cs` particle file (see the module
    docstring for the mapping); fields are checked here, so a bad file fails naming the .cs field and row."""
    path = Path(path)
    arr = load_cs(path)
    names = set(arr.dtype.names)
    missing = [f for f in REQUIRED_FIELDS if f not in names]
    if missing:
        raise InputError(f"{path}: the cryoSPARC file has no {', '.join(missing)} field(s); a particle file needs "
                         f"{', '.join(REQUIRED_FIELDS)} (export the particles from an extraction or refinement job)")
    idx = _field(arr, "blob/idx", path)
    if (idx < 0).any() or (idx != np.round(idx)).any():
        i = int(np.flatnonzero((idx < 0) | (idx != np.round(idx)))[0])
        raise InputError(f"{path}: blob/idx {idx[i]:g} at row {i} (0-based) is not an image index (0, 1, ...)")
    psize = _field(arr, "blob/psize_A", path)
    shape = _field(arr, "blob/shape", path, 2)
    stacks = _resolve_blob_paths(arr["blob/path"], path)
    n = len(arr)
    parts: dict[str, object] = {"rlnImageName": [f"{int(j) + 1}@{s}" for j, s in zip(idx, stacks)],
                                ID_LABEL: np.arange(1, n + 1, dtype=np.int64)}
    group = (_field(arr, "ctf/exp_group_id", path).astype(np.int64) + 1 if "ctf/exp_group_id" in names
             else np.ones(n, np.int64))
    parts["rlnOpticsGroup"] = group
    for f, (label, factor) in CTF_FIELDS.items():
        if f in names:
            parts[label] = _field(arr, f, path) * factor
    if "alignments3D/pose" in names:
        pose = _field(arr, "alignments3D/pose", path, 3)
        rot, tilt, psi = relion_angles(pose)
        parts.update(rlnAngleRot=rot, rlnAngleTilt=tilt, rlnAnglePsi=psi)
    if "alignments3D/shift" in names:
        shift = _field(arr, "alignments3D/shift", path, 2)
        parts["rlnOriginXAngst"] = shift[:, 0] * psize
        parts["rlnOriginYAngst"] = shift[:, 1] * psize
    if "alignments3D/split" in names:
        parts["rlnRandomSubset"] = _field(arr, "alignments3D/split", path).astype(np.int64) + 1
    particles = pd.DataFrame(parts)
    optics_rows = []
    for g in np.unique(group):
        i = int(np.flatnonzero(group == g)[0])
        row = {"rlnOpticsGroup": int(g), "rlnImagePixelSize": float(psize[i]), "rlnImageSize": int(shape[i, 1])}
        row |= {lab: float(particles[lab].iloc[i]) for lab in ("rlnVoltage", "rlnSphericalAberration",
                                                               "rlnAmplitudeContrast") if lab in particles}
        optics_rows.append(row)
    return {"optics": pd.DataFrame(optics_rows), "particles": particles}


def read_blocks(path: str | os.PathLike) -> dict:
    """The tables of a particle file as `starfile.read(path, always_dict=True)` gives them, or a .cs file's
    `read_cs_blocks`: for writers that copy the input's rows (e.g. 3DVA's particles_3dva.star)."""
    if is_cs_file(path):
        return read_cs_blocks(path)
    import starfile
    return starfile.read(path, always_dict=True)


def write_cs_latents(cs_path: str | os.PathLike, ids: np.ndarray, z: np.ndarray, out: str | os.PathLike) -> Path:
    """Write the particles of `cs_path` whose ids (1-based rows, as read_cs_blocks numbers them) are given, in
    that order, with `components_mode_<k>/component` (k) and `components_mode_<k>/value` (z[:, k]) fields, as a
    `.cs` file a cryoSPARC notebook can filter on (the uid of each row is kept). Needs cryosparc-tools."""
    from cryosparc.dataset import Dataset

    from .atomic import atomic_path
    cs_path = Path(cs_path)
    ids = np.asarray(ids, dtype=np.int64)
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or len(z) != len(ids):
        raise ValueError(f"latents of shape {z.shape} for {len(ids)} particle ids")
    d = Dataset.load(cs_path)
    if ids.min(initial=1) < 1 or ids.max(initial=1) > len(d):
        raise InputError(f"{cs_path} has {len(d)} particles but the latents name particle id "
                         f"{int(ids.max()) if ids.max(initial=1) > len(d) else int(ids.min())} (ids are its rows, "
                         "from 1): give the .cs file the latents were computed from")
    sub = d.take(ids - 1)
    for k in range(z.shape[1]):
        sub.add_fields([f"components_mode_{k}/component", f"components_mode_{k}/value"], ["u4", "f4"])
        sub[f"components_mode_{k}/component"] = k
        sub[f"components_mode_{k}/value"] = z[:, k]
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        sub.save(fh)
    return Path(out)


def write_cs_latents_beside(particles: str | os.PathLike, ids: np.ndarray, z: np.ndarray,
                            folder: str | os.PathLike) -> Path | None:
    """When `particles` is a .cs file, write `latents.cs` (write_cs_latents) into `folder` beside latents.csv, so
    cryoSPARC users filter on our latents in their own notebooks; None for STAR input."""
    if not is_cs_file(particles):
        return None
    try:
        import cryosparc.dataset  # noqa: F401
    except ImportError:
        print(f"WARNING: cryosparc-tools is not installed, so no {LATENTS_CS} is written beside the latents "
              "(pip install cryosparc-tools)", flush=True)
        return None
    return write_cs_latents(particles, ids, z, Path(folder) / LATENTS_CS)
