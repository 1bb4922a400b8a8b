"""Issue #11's cost target: flex-reconstruct against the Wiener reconstruction of the same particles, one run.

Prints two ratios on one set (particles.star with a trained model; the spec: 3,000 particles at box 64):
- engine only, one process: flex_reconstruct (defaults, noflex included, FSC mask gt/moving_mask.mrc when present)
  over reconstruct_particles, each the fastest of --repeats runs, alternated (the least disturbed by other jobs);
- CLI wall time: `flexplugin flex-reconstruct` over `flexplugin reconstruct` on the same STAR, same --device and
  --threads, each writing its outputs (half maps, FSC, resolution files) to a temporary folder.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_flex_reconstruct_cost.py --data SET --model TRAIN_DIR

Timings on a shared machine: compare the ratios measured in one run, not the seconds.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexplugin.engine.flex.generate import load_model
from flexplugin.engine.flex.reconstruct import flex_reconstruct
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.reconstruct import reconstruct_particles


def cli_seconds(args: list[str]) -> float:
    """Wall time of one `python -m flexplugin ...` run (failure: its output, then exit)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flexplugin", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"flexplugin {args[0]} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="folder with particles.star (and gt/moving_mask.mrc)")
    ap.add_argument("--model", required=True, help="flex-train's output folder for those particles")
    ap.add_argument("--repeats", type=int, default=2, help="engine-only runs of each (the fastest is kept)")
    ap.add_argument("--no-cli", action="store_true", help="engine-only ratio alone")
    a = ap.parse_args()
    star = a.data / "particles.star"
    mask_path = a.data / "gt/moving_mask.mrc"
    quiet = lambda s: None  # noqa: E731
    model = load_model(a.model, "cpu")
    ps = read_particles(star)
    mask = read_volume(mask_path)[0].astype(np.float32) if mask_path.exists() else None
    t_w: list[float] = []
    t_f: list[float] = []
    bins = 0
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        reconstruct_particles(ps, progress=quiet)
        t_w.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = flex_reconstruct(model, ps, mask=mask, progress=quiet)
        t_f.append(time.perf_counter() - t0)
        assert r is not None  # one process: rank 0
        bins = r.bins
    print(f"{a.data}: {len(ps)} particles, crop box {model.crop}, {bins} bins; torch threads "
          f"{torch.get_num_threads()}")
    print(f"  engine only: flex_reconstruct {min(t_f):.2f} s / reconstruct_particles {min(t_w):.2f} s = "
          f"{min(t_f) / min(t_w):.1f}x", flush=True)
    if a.no_cli:
        return
    common = ["--particles", str(star), "--device", "cpu", "--threads", str(torch.get_num_threads())]
    common += ["--mask", str(mask_path)] if mask is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        w = cli_seconds(["reconstruct", *common, "--out", f"{tmp}/rec"])
        f = cli_seconds(["flex-reconstruct", "--model", str(a.model), *common, "--out", f"{tmp}/frec"])
    print(f"  CLI wall time: flex-reconstruct {f:.1f} s / reconstruct {w:.1f} s = {f / w:.1f}x")


if __name__ == "__main__":
    main()
