"""Atomic output files: every engine output is written to a temp file beside it, then renamed over it.

An interrupted write (kill, crash, full disk) therefore leaves the previous version of the file intact,
never a truncated one, and a full disk (ENOSPC, EDQUOT, or EFBIG from a file-size limit) becomes a
`DiskFullError` naming the file, with the temp file removed.
"""
from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .errors import DiskFullError

__all__ = ["atomic_path", "recording", "temp_name", "write_text", "write_bytes", "write_json", "save_npy",
           "savetxt", "to_csv", "torch_save", "save_plot", "DISK_FULL_ERRNOS"]

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
TEMP_TAG = ".tmp"
_recorders: list[Callable[[Path], None]] = []  # told of every finished output (engine/outdir.py's manifest)


@contextmanager
def recording(record: Callable[[Path], None]) -> Iterator[None]:
    """Within the block, call `record(path)` for every file an atomic writer finishes (renames into place)."""
    _recorders.append(record)
    try:
        yield
    finally:
        _recorders.remove(record)


def temp_name(path: str | os.PathLike, keep_suffix: bool = False) -> Path:
    """The temp file of `path`: `name.tmp`, or `name.tmp.ext` for writers that pick the format from the suffix."""
    p = Path(path)
    return p.with_name(f"{p.name}{TEMP_TAG}{p.suffix}" if keep_suffix else f"{p.name}{TEMP_TAG}")


def _fsync(path: Path) -> None:
    """Flush the temp file to disk so a late ENOSPC (delayed allocation, NFS) surfaces before the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


@contextmanager
def atomic_path(path: str | os.PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temp path to write; on success it replaces `path`, on any error it is removed.

    OSError ENOSPC/EDQUOT/EFBIG raised while writing (or flushing) becomes DiskFullError(path)."""
    path = Path(path)
    tmp = temp_name(path, keep_suffix)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        for record in list(_recorders):
            record(path)
    except BaseException as e:
        _unlink_quietly(tmp)
        disk = e if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS else _disk_full_cause(e)
        if disk is not None and not isinstance(e, DiskFullError):
            raise DiskFullError(str(path), disk.errno or errno.ENOSPC) from e  # errno is set: see _disk_full_cause
        raise


def _disk_full_cause(e: BaseException) -> OSError | None:
    """A disk-full OSError wrapped by a library (e.g. torch's RuntimeError around a failed write)."""
    cur: BaseException | None = e
    seen = 0
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return cur
        msg = str(cur)
        if isinstance(cur, RuntimeError) and ("No space left" in msg or "File too large" in msg
                                              or "Disk quota" in msg):
            return OSError(errno.ENOSPC if "No space" in msg else errno.EFBIG, msg)
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return None


def save_plot(plot: Callable[..., Any], path: str | os.PathLike, *args, **kwargs) -> str:
    """Call `plot(*args, path=<temp path>, **kwargs)` (a plots*.py function saving a figure) atomically; returns
    `path`. The path goes by keyword, so a misplaced positional argument fails loudly; the temp name keeps the
    suffix, from which matplotlib picks the format."""
    with atomic_path(path, keep_suffix=True) as tmp:
        plot(*args, path=tmp, **kwargs)
    return str(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any, default: Callable | None = None) -> None:
    """Write indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, default=default))


def save_npy(path: str | os.PathLike, arr) -> None:
    """numpy.save atomically (through a file handle, so no `.npy` is appended to the temp name)."""
    import numpy as np
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def savetxt(path: str | os.PathLike, arr, **kwargs) -> None:
    """numpy.savetxt atomically."""
    import numpy as np
    with atomic_path(path) as tmp:
        np.savetxt(tmp, arr, **kwargs)


def to_csv(df, path: str | os.PathLike, **kwargs) -> None:
    """DataFrame.to_csv atomically."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **kwargs)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save atomically (checkpoints and models)."""
    import torch
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a Python handle: write errors stay OSErrors
        torch.save(obj, fh)
