"""The engine's error types: each message says what is wrong and how to fix it; the CLI maps them to exit codes."""
from __future__ import annotations

import errno
import os

EXIT_INPUT = 2  # bad input, bad option, missing GPU
EXIT_DISK_FULL = 3  # no space left (or a file-size/quota limit) while writing an output


class InputError(ValueError):
    """Bad input detected before heavy work; the CLI prints the message and exits with status 2."""


class DiskFullError(OSError):
    """An output could not be written for lack of space; the file's previous version is intact (exit status 3)."""

    def __init__(self, path: str, code: int = errno.ENOSPC):
        reason = {errno.EFBIG: "File too large for the file-size limit",
                  errno.EDQUOT: "Disk quota exceeded"}.get(code, "No space left on device")
        super().__init__(code, f"{reason} while writing {path}; earlier outputs are intact (nothing was "
                               "half-written); free space and rerun (flex-train and 3dva: add --continue to "
                               "resume from the last checkpoint)")
        self.path = os.fspath(path)

    def __str__(self) -> str:
        return self.strerror or ""  # always set: __init__ passes the message
