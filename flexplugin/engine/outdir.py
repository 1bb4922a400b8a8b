"""Output folders: checked before a job starts, locked while it runs, and cleaned of the files a rerun replaces.

`output_folder(path, command)` wraps one job (the CLI's `run` uses it for every command's `--out`):

* **Checks**: an `--out` that is a file, lies under a file, or cannot be written (read-only filesystem,
  no permission) is an InputError before any work.
* **Lock**: `.flexplugin.lock` in the folder is held with `flock` for the job's lifetime and names the
  holder (pid, host, command, start). A second job into the same folder is refused. The kernel drops the
  lock when its process dies, so a lock left by a killed job never blocks: a file whose pid is gone is
  stale. Where `flock` is unsupported (some network filesystems), the recorded pid decides: a lock of a
  pid that no longer runs on this host is stale; one from another host must be removed by hand.
* **Manifest**: `.flexplugin_outputs.json` lists, per command, the files the last run of that command
  wrote (every engine writer goes through `atomic.atomic_path`, which reports each finished file here).
  When a rerun succeeds, files of the earlier run that it did not write again (say `vol_040.mrc` after a
  rerun with fewer frames) are deleted, so the folder never mixes two runs. Only files in the manifest,
  unchanged since written (same size and mtime), are ever deleted: nothing the tool did not write.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import atomic
from .errors import DiskFullError, InputError

__all__ = ["LOCK_NAME", "MANIFEST_NAME", "OutputFolder", "check_writable_folder", "output_folder"]

LOCK_NAME = ".flexplugin.lock"
MANIFEST_NAME = ".flexplugin_outputs.json"
_FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


def _first_file_above(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or `path` itself) that is not a folder, if any."""
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def _why(e: OSError) -> str:
    reasons: dict[int | None, str] = {errno.EROFS: "the filesystem is read-only", errno.EACCES: "permission denied",
                                      errno.EPERM: "operation not permitted"}
    return reasons.get(e.errno, e.strerror or str(e))


def check_writable_folder(path: str | os.PathLike, option: str = "--out") -> list[Path]:
    """Create the folder `path` (and missing parents) or refuse with an InputError naming the cause: a file in
    its place or above it, a read-only filesystem, no permission. Returns the folders it created, top first."""
    p = Path(path)
    blocker = _first_file_above(p)
    if blocker is not None:
        where = "is a file" if blocker == p else f"lies under {blocker}, which is a file"
        raise InputError(f"{option} {p} {where}, not a folder; choose a folder path for {option}")
    created = [q for q in reversed([p, *p.parents]) if not q.exists()]
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in atomic.DISK_FULL_ERRNOS:
            raise DiskFullError(str(p), e.errno) from None
        raise InputError(f"cannot create the output folder {option} {p}: {_why(e)}; choose a folder you can "
                         "write to") from None
    if not os.access(p, os.W_OK | os.X_OK):
        why = "the filesystem is read-only" if os.statvfs(p).f_flag & os.ST_RDONLY else "permission denied"
        raise InputError(f"cannot write into the output folder {option} {p}: {why}; choose a folder you can "
                         "write to")
    return created


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a process (field 22 of /proc/PID/stat): tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` (started at `start`, when known) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = _start_time(pid)
    return start is None or now is None or now == start


def _holder_text(info: dict) -> str:
    if not info:
        return "another flexplugin job (it did not record its pid)"
    return (f"another flexplugin job ({info.get('command', '?')}, pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')}, started {info.get('started', '?')})")


class OutputFolder:
    """One job's hold on its output folder: the lock, and the files it writes (for the manifest)."""

    def __init__(self, path: str | os.PathLike, command: str, option: str = "--out"):
        self.path, self.command, self.option = Path(path), command, option
        self.root = ""
        self.written: dict[str, list[int]] = {}
        self.created: list[Path] = []
        self.deleted: list[str] = []
        self._fd: int | None = None

    # ------------------------------------------------------------------ lock
    def acquire(self) -> None:
        """Check and create the folder, then take its lock (InputError when another job holds it)."""
        self.created = check_writable_folder(self.path, self.option)
        self.root = os.path.realpath(self.path)
        lock = self.path / LOCK_NAME
        for _ in range(10):  # retried only if the lock file is replaced between open and flock
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if e.errno in atomic.DISK_FULL_ERRNOS:
                    raise DiskFullError(str(lock), e.errno) from None
                raise InputError(f"cannot write into the output folder {self.option} {self.path}: {_why(e)}; "
                                 "choose a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = _read_info(fd)
                os.close(fd)
                raise self._busy(info) from None
            except OSError as e:
                if e.errno not in _FLOCK_UNSUPPORTED:
                    os.close(fd)
                    raise
                info = _read_info(fd)  # no flock here: the recorded pid decides
                if info and not self._stale(info):
                    os.close(fd)
                    raise self._busy(info) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                self._write_info(fd)
                return
            os.close(fd)
        raise InputError(f"could not lock {lock}: it keeps being replaced; is another job starting there?")

    def _stale(self, info: dict) -> bool:
        """A recorded holder that no longer runs (this host only: other hosts cannot be checked)."""
        if info.get("host") != socket.gethostname():
            return False
        try:
            pid = int(info["pid"])
        except (KeyError, TypeError, ValueError):
            return True
        return pid != os.getpid() and not _pid_alive(pid, info.get("start"))

    def _busy(self, info: dict) -> InputError:
        return InputError(f"the output folder {self.option} {self.path} is in use by {_holder_text(info)}; wait "
                          f"for it to finish or choose another {self.option}. If no such job runs, delete "
                          f"{self.path / LOCK_NAME}")

    def _write_info(self, fd: int) -> None:
        """Record the holder in the lock file (best effort: a full disk leaves it empty, the flock still holds)."""
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "start": _start_time(os.getpid())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass

    def release(self) -> None:
        """Drop the lock (the lock file is removed first, so a waiting job cannot lock a deleted file)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path / LOCK_NAME)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------------ manifest
    def record(self, path: Path) -> None:
        """atomic_path's report of a finished output: kept when it lies in this folder."""
        real = os.path.realpath(path)
        rel = os.path.relpath(real, self.root)
        if rel.startswith(os.pardir) or os.path.isabs(rel) or rel in (LOCK_NAME, MANIFEST_NAME):
            return
        try:
            st = os.stat(real)
        except OSError:
            return
        self.written[rel] = [st.st_size, st.st_mtime_ns]

    def _read_manifest(self) -> dict:
        try:
            d = json.loads((self.path / MANIFEST_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def _write_manifest(self, manifest: dict) -> None:
        atomic.write_text(self.path / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))

    def finish(self, ok: bool) -> list[str]:
        """After the job: on success delete the earlier run's files not written again and record this run's;
        after a failure only add the new files to the record (nothing is deleted). Returns the deleted files."""
        manifest = self._read_manifest()
        before = manifest.get(self.command, {})
        before = before if isinstance(before, dict) else {}
        if not ok:
            merged = {**before, **self.written}
            if merged != before:
                try:
                    self._write_manifest({**manifest, self.command: merged})
                except OSError:
                    pass
            return []
        deleted = [rel for rel, stat in sorted(before.items()) if rel not in self.written and self._remove(rel, stat)]
        self.deleted = deleted
        manifest[self.command] = self.written
        if manifest != self._read_manifest():
            self._write_manifest(manifest)
        return deleted

    def _remove(self, rel: str, stat) -> bool:
        """Delete an earlier output if it is still the file that run wrote; then its emptied sub-folders."""
        p = Path(os.path.normpath(os.path.join(self.root, rel)))
        inside = os.path.realpath(p).startswith(self.root + os.sep)  # no way out through a link or '..'
        if os.path.isabs(rel) or not inside or p.is_symlink() or not p.is_file():
            return False
        st = p.stat()
        if not isinstance(stat, list) or [st.st_size, st.st_mtime_ns] != stat:
            return False  # changed since that run wrote it: not ours to delete
        try:
            p.unlink()
        except OSError:
            return False
        for d in p.parents:
            if str(d) == self.root or not str(d).startswith(self.root):
                break
            try:
                d.rmdir()  # only when empty
            except OSError:
                break
        return True

    def remove_created_if_empty(self) -> None:
        """After a failed job, remove the folders it created if they hold nothing (a bad input leaves no trace)."""
        for d in reversed(self.created):
            try:
                d.rmdir()
            except OSError:
                break


def _read_info(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        d = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


@contextmanager
def output_folder(path: str | os.PathLike, command: str, option: str = "--out") -> Iterator[OutputFolder]:
    """Hold `path` as the output folder of one `command` run (checks, lock, manifest; see module docstring)."""
    folder = OutputFolder(path, command, option)
    folder.acquire()
    ok = False
    try:
        with atomic.recording(folder.record):
            yield folder
        ok = True
    finally:
        try:
            folder.finish(ok)
        finally:
            folder.release()
            if not ok:
                folder.remove_created_if_empty()
