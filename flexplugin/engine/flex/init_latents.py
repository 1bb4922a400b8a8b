"""The initial latents of a 3D Flex training (flex-train --init-latents): read from .npy (particle row order) or a
.csv/.star keyed by particle id (e.g. 3DVA's latents.csv or particles_3dva.star), with every bad cell an InputError
naming the file, column and particle; flex/train.normalize_init_latents then scales them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..latents import ID_LABEL

__all__ = ["NOT_COORDINATES", "read_init_latents"]


def read_init_latents(path: str, ids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """N×M coordinates in the particles' row order from .npy (row order) or .csv/.star keyed by rlnImageId, and
    the M column names; a text, NaN or Inf cell is an InputError naming the file, column and first bad row."""
    import pandas as pd

    from ..errors import InputError
    p = Path(path)
    if not p.exists():
        raise InputError(f"initial latents not found: {path}")
    if p.suffix == ".npy":
        z = _read_npy_latents(p, len(ids))
        z = _finite_cells(pd.DataFrame(z), path, lambda i: f"row {i} (0-based)")
        return z, [str(j) for j in range(z.shape[1])]
    df = _read_latent_table(p)
    if ID_LABEL not in df:
        raise InputError(f"{path} has no {ID_LABEL} column to match particles by id")
    cols = [c for c in df.columns if c != ID_LABEL and _is_coordinate_column(str(c), df[c])]
    if not cols:
        raise InputError(f"{path} has no coordinate columns")
    dup = df[ID_LABEL][df[ID_LABEL].duplicated()]
    if len(dup):
        raise InputError(f"{path}: particle id {dup.iloc[0]} appears more than once; each particle needs one row")
    table = df.set_index(ID_LABEL)[cols]
    missing = np.setdiff1d(ids, table.index.to_numpy())
    if len(missing):
        raise InputError(f"{len(missing)} particles (e.g. id {missing[0]}) have no initial latent in {path}")
    z = _finite_cells(table.loc[ids], path, lambda i: f"particle id {ids[i]}", nan="NaN or an empty cell")
    return z, [str(c) for c in cols]


def _read_npy_latents(p: Path, n: int) -> np.ndarray:
    """An N×M numeric .npy (row order = particle order); unreadable, non-numeric or mis-shaped: InputError."""
    from ..errors import InputError
    try:
        z = np.load(p)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"cannot read {p} as a NumPy array ({e}); write it with numpy.save") from None
    if z.dtype.kind not in "biuf":
        raise InputError(f"{p} holds {z.dtype} values; initial latents must be numbers")
    if z.ndim != 2 or len(z) != n:
        raise InputError(f"{p} holds {z.shape} but there are {n} particles; use a file keyed by "
                         "rlnImageId (.csv/.star) when the particle sets differ")
    return z


def _read_latent_table(p: Path):
    """The table of a .star (its particles block, else the first) or .csv; unreadable: InputError."""
    import pandas as pd

    from ..errors import InputError
    kind = "STAR" if p.suffix == ".star" else "CSV"
    try:
        if kind == "CSV":
            return pd.read_csv(p)
        import starfile
        d = starfile.read(p, always_dict=True)
    except Exception as e:  # noqa: BLE001  (parser errors of pandas and starfile, empty files)
        raise InputError(f"cannot read the initial latents {p} as {kind}: {e}") from None
    table = d.get("particles", next(iter(d.values()), None))
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"cannot read the initial latents {p} as STAR: it holds no table (loop_) of particles")
    return table


# per-particle numbers that are not coordinates: 3DVA's scale (latents.csv, particles_3dva.star), 3dva-display's
# cluster labels and frame weights; they must never seed a latent (with --k 3 on a K=2 run, `scale` would)
NOT_COORDINATES = frozenset({"scale", "rlnFlex3dvaScale", "cluster", "rlnFlex3dvaFrameWeight"})


def _is_coordinate_column(name: str, col) -> bool:
    """Columns that may hold coordinates: rlnFlex* or non-RELION labels that are numbers (a text cell among
    numbers is kept, to be reported as bad; all-text or boolean columns, and NOT_COORDINATES, are not)."""
    import pandas as pd
    if name in NOT_COORDINATES:
        return False
    if (name.startswith("rln") and not name.startswith("rlnFlex")) or pd.api.types.is_bool_dtype(col):
        return False
    return pd.api.types.is_numeric_dtype(col) or bool(pd.to_numeric(col, errors="coerce").notna().any())


def _finite_cells(raw, path: str, where, nan: str = "NaN") -> np.ndarray:
    """`raw` (a DataFrame) as float64; the first text, NaN or Inf cell (row-major) is an InputError."""
    import pandas as pd

    from ..errors import InputError
    num = raw.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.argwhere(~np.isfinite(num))
    if len(bad):
        i, j = bad[0]
        v = raw.iat[i, j]
        what = f"the text {v!r}" if isinstance(v, str) else (nan if np.isnan(num[i, j]) else f"{num[i, j]}")
        raise InputError(f"{path}: column {raw.columns[j]} holds {what} at {where(i)} (the first bad row); initial "
                         "latents must be finite numbers: fix the file, or drop that column or particle")
    return num
