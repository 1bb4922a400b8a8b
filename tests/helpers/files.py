"""Reading outputs back in tests: every file's bytes under a folder, and a map as float64."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np


def snapshot(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Bytes of every file under a folder, by relative path; files named in `skip` (e.g. the job lock) left out."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name not in skip}


def read_map(path: Path) -> np.ndarray:
    """An MRC map's data as float64 (permissive: our own writer's headers are checked elsewhere)."""
    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float64)
