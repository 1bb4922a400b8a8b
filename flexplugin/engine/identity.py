"""Is this the same particle? Particle ids alone cannot tell: two data sets numbered from 1 share every id.

A run (3DVA run folder, 3D Flex model.pt) records per particle its image (index and stack file name) and its
defocus; particles given later for the same ids must match both. The stack name is compared without its
folder, so a data set moved elsewhere still matches; the defocus tells apart two data sets whose stacks
happen to have the same names (a change of more than 10 % is more than CTF refinement moves a particle).
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = ["DEFOCUS_TOLERANCE", "check_same_particles", "particle_record"]

DEFOCUS_TOLERANCE = 0.10


def _image_key(name: str) -> str:
    i, _, path = str(name).rpartition("@")
    try:
        i = str(int(i)) if i else "1"
    except ValueError:
        pass
    return f"{i}@{os.path.basename(path)}"


def particle_record(table: pd.DataFrame) -> dict:
    """What identifies each row of a particle table: image keys 'index@stack-name' and rlnDefocusU (or None)."""
    rec = {"image": [_image_key(n) for n in table["rlnImageName"]], "defocus_u": None}
    if "rlnDefocusU" in table:
        rec["defocus_u"] = pd.to_numeric(table["rlnDefocusU"], errors="coerce").to_numpy(np.float64).tolist()
    return rec


def check_same_particles(ids: np.ndarray, record: dict, ps, source: str, run: str) -> None:
    """The particles `ps` (an io.ParticleSet) with ids `ids` must be those `record` (particle_record, rows
    aligned with `ids`) describes; the first one that is not is an InputError naming `source` and `run`."""
    given = ps.table.set_index(ps.ids)
    common = np.isin(ids, ps.ids)
    if not common.any():
        return
    ids = np.asarray(ids)[common]
    a = np.asarray(record["image"], dtype=object)[common]
    b = np.array([_image_key(n) for n in given.loc[ids, "rlnImageName"]], dtype=object)
    what = "image (index@stack)"
    if record.get("defocus_u") is not None and "rlnDefocusU" in given:
        da = np.asarray(record["defocus_u"], dtype=np.float64)[common]
        db = pd.to_numeric(given.loc[ids, "rlnDefocusU"], errors="coerce").to_numpy(np.float64)
        other = np.abs(da - db) > DEFOCUS_TOLERANCE * np.abs(da)
        a = np.where(other, [f"{x} (defocus {d:.0f} Å)" for x, d in zip(a, da)], a)
        b = np.where(other, [f"{x} (defocus {d:.0f} Å)" for x, d in zip(b, db)], b)
        what += " and defocus"
    bad = np.nonzero(a != b)[0]
    if len(bad):
        i = bad[0]
        raise InputError(f"{source}: {len(bad)} of {len(a)} particle ids name other particles than in {run} (id "
                         f"{ids[i]}: {what} {b[i]} here, {a[i]} there); the ids overlap but the particles differ: "
                         "give the particles that run used")
