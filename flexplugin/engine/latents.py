"""The latents file: each particle's latent coordinates keyed by its particle id, the one exchange layout.

Every command that hands per-particle coordinates to another (3dva, flex-train, the Scipion protocols through
`flexplugin/convert.py`) writes and reads them here, in one layout:

    latents.csv   rlnImageId, z0, z1, …, z{K-1}[, extra per-particle columns such as 3DVA's `scale`]
    latents.npy   (N, K) coordinates in the rows' order (a convenience for NumPy users)

Rows are matched by `rlnImageId` (the particle's id: Scipion's object id, RELION's image id), never by order.
Older files are still read: flex-train wrote `rlnFlexLatent1..K` and the training protocol's seed files
`zFlex1..K` (both numbered from 1); they come back under the current names.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import save_npy, to_csv
from .errors import InputError

__all__ = [
    "ID_LABEL",
    "LATENTS_CSV",
    "LATENTS_NPY",
    "LATENT_COLUMN",
    "Latents",
    "latent_columns",
    "read_latents",
    "write_latents",
    "write_latents_files",
]

ID_LABEL = "rlnImageId"  # the particle id of every engine file (STAR, latents), a standard RELION label
LATENT_COLUMN = "z{}"  # coordinate k (0-based) of the latents file
LATENTS_CSV = "latents.csv"
LATENTS_NPY = "latents.npy"
FLOAT_FORMAT = "%.9g"  # enough digits to give float32 coordinates back exactly
# layouts of older files, read back under LATENT_COLUMN: (pattern, number of the first coordinate)
LEGACY_COLUMNS = ((re.compile(r"^rlnFlexLatent(\d+)$"), 1), (re.compile(r"^zFlex(\d+)$"), 1))
_CURRENT = re.compile(r"^z(\d+)$")


def latent_columns(k: int) -> list[str]:
    """The coordinate column names of a K-dimensional latents file: z0 … z{K-1}."""
    return [LATENT_COLUMN.format(i) for i in range(k)]


@dataclass
class Latents:
    """Coordinates read from a latents file: `ids` (N,), `z` (N, K) in the file's row order, and the file's
    other per-particle columns (e.g. 3DVA's `scale`) by name."""
    ids: np.ndarray
    z: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.z.shape[1])

    def by_id(self) -> dict[int, int]:
        """{particle id: row}, to look particles up by id."""
        return {int(i): r for r, i in enumerate(self.ids)}


def write_latents(path: str | os.PathLike, ids, z, extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write the latents CSV (id, z0..z{K-1}, then the `extra` columns) atomically; returns its path."""
    import pandas as pd  # here, not at the top: protocols read this module's names when Scipion loads them
    ids = np.asarray(ids, dtype=np.int64)
    z = np.asarray(z)
    if z.ndim != 2 or len(z) != len(ids):
        raise ValueError(f"latents of shape {z.shape} for {len(ids)} particle ids")
    cols = {ID_LABEL: ids} | {c: z[:, i] for i, c in enumerate(latent_columns(z.shape[1]))}
    for name, v in (extra or {}).items():
        if name in cols or _coordinate_index(name) is not None:
            raise ValueError(f"extra column {name!r} would read back as an id or a coordinate")
        cols[name] = np.asarray(v)
    to_csv(pd.DataFrame(cols), path, index=False, float_format=FLOAT_FORMAT)
    return Path(path)


def write_latents_files(folder: str | os.PathLike, ids, z, extra: dict[str, np.ndarray] | None = None
                        ) -> dict[str, str]:
    """Write `latents.npy` (row order) and `latents.csv` (by id) into `folder`; returns their names by role."""
    folder = Path(folder)
    save_npy(folder / LATENTS_NPY, z)
    write_latents(folder / LATENTS_CSV, ids, z, extra)
    return {"latents": LATENTS_NPY, "latents_csv": LATENTS_CSV}


def _coordinate_index(name: str) -> int | None:
    """The 0-based coordinate a column holds, in the current or an older layout; None for other columns."""
    m = _CURRENT.match(name)
    if m:
        return int(m.group(1))
    for pattern, first in LEGACY_COLUMNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1)) - first
    return None


def read_latents(path: str | os.PathLike) -> Latents:
    """Read a latents CSV (current or older layout); a missing, unreadable or malformed file is an InputError
    naming it (no id column, a repeated id, coordinates that are not 0..K-1, a cell that is not a finite number)."""
    import pandas as pd
    p = Path(path)
    if not p.exists():
        raise InputError(f"latents file not found: {p}")
    try:
        df = pd.read_csv(p)
    except Exception as e:  # noqa: BLE001  (pandas' parser errors, an empty file)
        raise InputError(f"cannot read the latents file {p} as CSV: {e}") from None
    if ID_LABEL not in df:
        raise InputError(f"{p} has no {ID_LABEL} column to match particles by id")
    coords: dict[int, str] = {}
    for c in df.columns:
        k = _coordinate_index(str(c))
        if k is not None:
            if k in coords:
                raise InputError(f"{p}: columns {coords[k]} and {c} both hold coordinate {k}")
            coords[k] = c
    if sorted(coords) != list(range(len(coords))) or not coords:
        raise InputError(f"{p}: the coordinate columns {list(coords.values())} are not z0..z{{K-1}}")
    ids = pd.to_numeric(df[ID_LABEL], errors="coerce").to_numpy(np.float64)
    if not np.isfinite(ids).all() or (ids != np.round(ids)).any():
        raise InputError(f"{p}: {ID_LABEL} holds a value that is not a whole number (row "
                         f"{int(np.argmax(~np.isfinite(ids) | (ids != np.round(ids))))}, 0-based)")
    ids = ids.astype(np.int64)
    dup = pd.Series(ids)[pd.Series(ids).duplicated()]
    if len(dup):
        raise InputError(f"{p}: particle id {dup.iloc[0]} appears more than once")
    names = [coords[k] for k in range(len(coords))]
    z = df[names].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.argwhere(~np.isfinite(z))
    if len(bad):
        i, j = bad[0]
        raise InputError(f"{p}: column {names[j]} holds {df[names[j]].iloc[i]!r} at particle id {ids[i]}; "
                         "coordinates must be finite numbers")
    extra = {str(c): df[c].to_numpy() for c in df.columns if c != ID_LABEL and c not in names}
    return Latents(ids, z, extra)
