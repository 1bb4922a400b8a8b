"""Prepared-particles cache: the images at the training box, float16, in a scratch folder, built once.

flex-train reads every particle once per epoch. Without a cache each batch re-reads the full-box images and
re-crops them (real-space crop to C, Fourier crop to T, `prep.prep_images`). With `--scratch DIR` (or the
FLEXPLUGIN_SCRATCH environment variable) the prepared images are written once to DIR as a float16 .npy
(`images.npy`, N x T x T, written through np.lib.format.open_memmap), so an epoch reads 2·T² bytes per particle
instead of 4·B² (B the particle box) and crops nothing. Batches read their rows with positioned reads (ParticleCache), so the
process holds only the batch: memory stays flat in the number of particles. Each image is stored divided by its
RMS (kept in float32 in `scales.npy`), so float16 keeps its full 11-bit relative precision whatever the
images' normalisation (no overflow of raw counts, no subnormal loss of tiny values).

The cache folder is named by a fingerprint of the particle set (ids, image names, and every stack's path, size
and modification time) and of the crop and training boxes, so a changed input or box builds a new one; an
unchanged one is reused by later runs. It is built in a temporary folder and renamed into place (atomic).

Under torchrun rank 0 builds it while the other ranks wait in one small all-reduce per chunk (a heartbeat that
keeps them inside the collective timeout however long the build takes). Every rank needs every particle
(each global batch is split by rank, `distributed.shard`, and batches are reshuffled each epoch), so one full
cache per filesystem, not a shard per rank. A scratch folder local to each node (e.g. $TMPDIR on a cluster)
is found missing on the other nodes after that round; then the first process of each such node (LOCAL_RANK 0)
builds its own copy the same way. See docs/distributed.md, "Data at scale".
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..distributed import all_reduce_, rank, world
from ..errors import DiskFullError, InputError
from ..io import ParticleSet, split_image_name
from .loading import SCRATCH_ENV
from .prep import PrepSpec, prep_images

__all__ = ["SCRATCH_ENV", "ParticleCache", "cache_bytes", "fingerprint", "open_cache", "scratch_folder"]

FORMAT = 1  # bump when the stored layout changes: older caches are then not reused
CHUNK = 256  # particles prepared per step of the build


def scratch_folder(option: str | None) -> Path | None:
    """The scratch folder from `--scratch` or FLEXPLUGIN_SCRATCH (None: no cache), made if absent and checked
    writable now, before any heavy work; an unusable one is an InputError naming it."""
    source = "--scratch"
    if option is None:
        option, source = os.environ.get(SCRATCH_ENV), SCRATCH_ENV
    if option is None or not str(option).strip():
        if source == "--scratch" and option is not None:
            raise InputError("--scratch is empty: give a folder for the prepared-particles cache")
        return None
    p = Path(option).expanduser()
    if p.exists() and not p.is_dir():
        raise InputError(f"{source} {option}: is a file, not a folder; give a folder for the prepared-particles "
                         "cache")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{source} {option}: cannot create the scratch folder ({e.strerror}); give a writable "
                         "folder") from None
    probe = p / f".flexplugin-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{source} {option}: cannot write into the scratch folder ({e.strerror}); give a writable "
                         "folder") from None
    return p


def fingerprint(ps: ParticleSet, spec: PrepSpec) -> str:
    """A hex digest naming the prepared images: particle ids, image names, each stack's path, size and mtime,
    the boxes and the cache format; any change gives another name (and so a rebuild)."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "box": spec.box, "crop": spec.crop, "train": spec.train}).encode())
    h.update(np.ascontiguousarray(ps.ids, dtype=np.int64).tobytes())
    names = ps.table["rlnImageName"].astype(str).tolist()
    h.update("\n".join(names).encode())
    for path in sorted({split_image_name(s)[1] for s in names}):
        st = os.stat(path)
        h.update(f"\n{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def cache_bytes(n: int, train: int) -> int:
    """Bytes the cache of `n` particles at training box `train` takes on disk (images + scales + headers)."""
    return n * train * train * 2 + n * 4 + 2 * 4096


class ParticleCache:
    """Prepared images read from a cache folder: float16 images (an .npy) and their float32 scales.

    Rows are read with positioned reads (os.preadv) into the batch, not through the memory map: with the page
    cache's large folios a page fault maps megabytes of the file around each image, so an epoch's random rows
    would soon map the whole cache into the process (measured: all of a 320 MB cache after 6,400 of its 40,000
    images). The file stays in the kernel's page cache; the process's resident memory stays one batch."""

    def __init__(self, folder: Path):
        self.folder, self._pid = folder, -1
        self._fd: int | None = None
        self.images16 = np.load(folder / "images.npy", mmap_mode="r")  # shape, dtype and data offset; not read
        self.scales = np.load(folder / "scales.npy")
        self.info = json.loads((folder / "info.json").read_text())

    def __len__(self) -> int:
        return len(self.scales)

    def _file(self) -> int:
        """This process's descriptor of images.npy (DataLoader workers forked from it open their own)."""
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.folder / "images.npy", os.O_RDONLY), os.getpid()
        return self._fd

    def images(self, rows: np.ndarray) -> np.ndarray:
        """Images (B, T, T) float32 for 0-based table rows `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        t = self.images16.shape[-1]
        x = np.empty((len(rows), t, t), dtype=np.float16)
        size, base, fd = t * t * 2, self.images16.offset, self._file()
        for j, r in enumerate(rows.tolist()):
            if not 0 <= r < len(self.scales):
                raise IndexError(f"row {r} is outside the cache of {len(self.scales)} particles")
            if os.preadv(fd, [memoryview(x[j]).cast("B")], base + r * size) != size:
                raise InputError(f"{self.folder / 'images.npy'} is shorter than its header says: delete the "
                                 "folder and rerun to rebuild the cache")
        return x.astype(np.float32) * self.scales[rows, None, None]

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)  # absent when __init__ failed
        if fd is not None and self._pid == os.getpid():
            os.close(fd)


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", str(rank()))) if world() > 1 else 0


def _count(flag: bool, device: torch.device) -> int:
    """The number of ranks for which `flag` holds (the flag itself in one process)."""
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    return int(all_reduce_(t).item())


def _complete(folder: Path, n: int, train: int) -> bool:
    """Whether `folder` holds a finished cache of `n` images at box `train` (a damaged one counts as absent)."""
    try:
        info = json.loads((folder / "info.json").read_text())
        img = np.load(folder / "images.npy", mmap_mode="r")
        sc = np.load(folder / "scales.npy", mmap_mode="r")
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and img.shape == (n, train, train) and img.dtype == np.float16 \
        and sc.shape == (n,)


def _disk_full(path: Path, need: int, free: int | None = None, code: int = errno.ENOSPC) -> DiskFullError:
    """A DiskFullError (exit 3) saying what the cache needs and how to go on."""
    e = DiskFullError(str(path), code)
    reason = {errno.EFBIG: "File too large for the file-size limit", errno.EDQUOT: "Disk quota exceeded"}.get(
        code, "No space left on device")
    have = f" ({free / 2**30:.2f} GiB free)" if free is not None else ""
    e.strerror = (f"{reason} for the prepared-particles cache {path}: it needs "
                  f"{need / 2**30:.2f} GiB{have}; free space there, give another --scratch (or FLEXPLUGIN_SCRATCH), "
                  "or drop it to read the particle stacks directly")
    return e


def _build(ps: ParticleSet, spec: PrepSpec, final: Path, active: bool, device: torch.device,
           progress: Callable[[str], None]) -> None:
    """Write the cache into a temporary folder beside `final` and rename it into place (`active` ranks); every
    rank walks the same chunks, the inactive ones only answering the heartbeat."""
    n, t = len(ps), spec.train
    tmp = final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    images = scales = None
    try:
        if active:
            need, free = cache_bytes(n, t), shutil.disk_usage(final.parent).free
            if free < need:
                raise _disk_full(final, need, free)
            tmp.mkdir()
            images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float16, shape=(n, t, t))
            try:  # reserve the blocks now: a full disk is an error here, not a SIGBUS while writing the map
                with open(tmp / "images.npy", "r+b") as fh:
                    os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise _disk_full(final, need, code=e.errno) from None
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            scales = np.empty(n, dtype=np.float32)
            progress(f"flex-train: preparing {n} particles at the training box {t} in {final} (once; later runs "
                     "reuse it)")
        for s in range(0, n, CHUNK):
            if active:
                assert images is not None and scales is not None  # made above for the active ranks
                rows = np.arange(s, min(s + CHUNK, n))
                x = prep_images(torch.from_numpy(ps.images(rows)).to(device), spec).to(torch.float64)
                rms = x.square().mean(dim=(-2, -1)).sqrt()
                rms = torch.where(rms > 0, rms, torch.ones_like(rms))
                images[rows] = (x / rms[:, None, None]).to(torch.float16).cpu().numpy()
                scales[rows] = rms.to(torch.float32).cpu().numpy()
            _count(False, device)  # heartbeat: the waiting ranks stay inside the collective timeout
        if active:
            assert images is not None and scales is not None
            images.flush()
            del images
            np.save(tmp / "scales.npy", scales)
            (tmp / "info.json").write_text(json.dumps({"format": FORMAT, "particles": n, "box": spec.box,
                                                       "crop": spec.crop, "train": t, "dtype": "float16",
                                                       "star": ps.star_path}))
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished the same cache first: keep theirs
                if not _complete(final, n, t):
                    stale = final.with_name(f"{final.name}.stale-{socket.gethostname()}-{os.getpid()}")
                    os.rename(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                    os.rename(tmp, final)
    except OSError as e:
        if isinstance(e, DiskFullError):
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise _disk_full(final, cache_bytes(n, t), code=e.errno) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_cache(ps: ParticleSet, spec: PrepSpec, scratch: Path, device: torch.device | str = "cpu",
               progress: Callable[[str], None] = print) -> ParticleCache:
    """The cache of `ps` at `spec` in `scratch`: reused when present and complete, else built once (rank 0;
    then LOCAL_RANK 0 of any node that does not see it); every rank of a torchrun job must call it."""
    dev = torch.device(device)
    Path(scratch).mkdir(parents=True, exist_ok=True)
    final = Path(scratch) / f"flexplugin-prep-{fingerprint(ps, spec)}"
    n, t = len(ps), spec.train
    for first, builder in ((True, rank() == 0), (False, _local_rank() == 0)):
        missing = not _complete(final, n, t)
        if _count(builder and missing, dev):
            _build(ps, spec, final, builder and missing, dev, progress)
        elif first and rank() == 0:
            progress(f"flex-train: reusing the prepared particles in {final}")
        if world() == 1:
            break
    if not _complete(final, n, t):
        raise InputError(f"the prepared-particles cache {final} was not written; check the scratch folder")
    return ParticleCache(final)
