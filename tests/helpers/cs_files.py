"""cryoSPARC .cs particle files made from our STAR files, for the .cs reader's tests and the bad-metadata catalogue."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import starfile

from flexplugin.engine.geometry import euler_to_matrix_np


def star_to_cs(star: Path, out: Path, mutate=None) -> Path:
    """Write a cryoSPARC-style .cs (NumPy structured array) holding a RELION 3.1 file's particles; `mutate(arr)`
    may spoil it. Poses by SciPy: R(pose) = Aᵀ, A RELION's matrix (the convention cryoDRGN reads)."""
    from scipy.spatial.transform import Rotation
    tabs = starfile.read(star, always_dict=True)
    p = tabs["particles"].merge(tabs["optics"], on="rlnOpticsGroup", suffixes=("", "_o"))
    n, apix = len(p), float(p["rlnImagePixelSize"].iloc[0])
    A = euler_to_matrix_np(*(p[c].to_numpy(float) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
    idx, paths = zip(*(s.split("@") for s in p["rlnImageName"]))
    dt = [("uid", "u8"), ("blob/path", "S64"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
          ("blob/psize_A", "f4"), ("ctf/exp_group_id", "u4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
          ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"), ("ctf/df_angle_rad", "f4"),
          ("ctf/phase_shift_rad", "f4"), ("alignments3D/pose", "f4", (3,)), ("alignments3D/shift", "f4", (2,)),
          ("alignments3D/split", "u4")]
    a = np.zeros(n, dtype=dt)
    a["uid"] = np.random.default_rng(0).integers(1, 2**63, n, dtype=np.uint64) * 2 + 1  # above int64 too
    a["blob/path"] = [s.encode() for s in paths]
    a["blob/idx"] = np.array(idx, dtype=np.int64) - 1
    a["blob/shape"] = int(p["rlnImageSize"].iloc[0])
    a["blob/psize_A"] = apix
    a["ctf/accel_kv"], a["ctf/cs_mm"] = p["rlnVoltage"], p["rlnSphericalAberration"]
    a["ctf/amp_contrast"], a["ctf/df1_A"], a["ctf/df2_A"] = p["rlnAmplitudeContrast"], p["rlnDefocusU"], p["rlnDefocusV"]
    a["ctf/df_angle_rad"] = np.deg2rad(p["rlnDefocusAngle"].to_numpy(float))
    a["alignments3D/pose"] = Rotation.from_matrix(A.transpose(0, 2, 1)).as_rotvec()
    a["alignments3D/shift"] = np.stack([p["rlnOriginXAngst"], p["rlnOriginYAngst"]], 1) / apix
    a["alignments3D/split"] = np.arange(n) % 2
    if mutate is not None:
        a = mutate(a)
    with open(out, "wb") as fh:
        np.save(fh, a)
    return out
