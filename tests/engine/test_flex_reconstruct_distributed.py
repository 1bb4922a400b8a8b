"""flex-reconstruct under torch.distributed (torchrun, gloo on the CPU): two processes, each inserting half the
particles into the latent bins' accumulators before they are summed, give one process's maps to float tolerance.

Each run is tests/engine/dist_flex_reconstruct.py in its own process (120 particles, box 32, a random-flow model with up to
8 latent bins, 3 CG iterations per half map).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

WORKER = Path(__file__).with_name("dist_flex_reconstruct.py")


def _run(data: Path, out: Path, nproc: int) -> dict:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
              if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*launch, str(WORKER), str(data), str(out)], check=False, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_processes_reconstruct_what_one_does(small_flex_data, tmp_path):
    one = _run(small_flex_data, tmp_path / "one.pt", 1)
    two = _run(small_flex_data, tmp_path / "two.pt", 2)
    assert (one["world"], two["world"]) == (1, 2)
    assert one["bins"] == two["bins"] > 1
    assert one["half_counts"] == two["half_counts"] and sum(two["half_counts"]) == 120  # each particle once
    for key in ("start", "noflex", "flex"):
        scale = float(np.abs(one[key]).max())
        np.testing.assert_allclose(two[key], one[key], rtol=0, atol=1e-4 * scale, err_msg=key)
    # the motion changed the map (the flex maps are not the Wiener start), so the comparison has something to see
    assert np.abs(one["flex"] - one["start"]).max() > 1e-2 * float(np.abs(one["start"]).max())
    for name, hist in one["objective"].items():
        np.testing.assert_allclose(two["objective"][name], hist, rtol=1e-4, err_msg=name)
