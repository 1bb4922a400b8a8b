"""Running the command-line tool as a user does: `python -m flexplugin ...` in a child process."""
from __future__ import annotations

import subprocess
import sys


def run_cli(*args: object, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run `python -m flexplugin ARGS` and capture its exit status, stdout and stderr (never raises on failure)."""
    return subprocess.run([sys.executable, "-m", "flexplugin", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)
