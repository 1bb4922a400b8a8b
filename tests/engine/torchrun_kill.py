"""Shared by the torchrun failure tests: start a 2-process job, SIGKILL one rank once the first checkpoint exists."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_a_rank_after_checkpoint(cmd: list[str], checkpoint: Path, env: dict, timeout: float = 600) -> tuple:
    """Run torchrun `cmd` (2 processes); when `checkpoint` appears, kill its second worker with SIGKILL and wait.
    Returns (return code, stdout, stderr) of torchrun, and asserts torchrun named the killed rank's signal."""
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before its first checkpoint"
        workers = [int(p) for p in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "exitcode" in stderr and "-9" in stderr, stderr[-2000:]  # torchrun names the killed rank's signal
    return job.returncode, stdout, stderr
