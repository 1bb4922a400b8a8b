"""Wiener reconstruction vs relion_reconstruct on the same STAR: wall time and per-shell FSC with the truth.

For each data set (the built-in example, and the pdb_motion benchmarks adk-closure / hivpr-mode) the
particles are simulated once into the work folder; then `relion_reconstruct --ctf` and our
`reconstruct_particles` run on the very same particles.star. The truth is the simulator's consensus.mrc (the
average over the motion distribution). Printed: both wall times and their ratio, FSC(map, truth) per shell
for both programs, and the smallest difference ours − RELION's over the shells to Nyquist (target ≥ −0.01).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_reconstruct.py --data example adk-closure --n 3000 --box 64

Timings on a shared machine: compare the ratio measured in one run, not the seconds.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexplugin.engine.fourier import fsc
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.pdb_motion import make_benchmark
from flexplugin.engine.reconstruct import reconstruct_particles
from flexplugin.engine.simulate import SimConfig, simulate_dataset

SDIST = "mdanalysistests-2.11.0"


def make_data(name: str, out: Path, n: int, box: int, refdata: Path, snr: float) -> None:
    """Simulate once (kept in the work folder: reruns reuse it)."""
    if (out / "particles.star").exists():
        return
    if name == "example":
        simulate_dataset(SimConfig(n=n, box=box, apix=128.0 / box, snr=snr, seed=5), out, progress=lambda s: None)
    else:
        make_benchmark(name, refdata / SDIST, out, n=n, box=box, apix=96.0 / box, snr=snr, seed=1,
                       progress=lambda s: None)


def run_relion(data: Path, threads: int) -> tuple[np.ndarray, float]:
    """relion_reconstruct --ctf on data/particles.star; returns the map and its wall time."""
    exe = shutil.which("relion_reconstruct")
    if exe is None:
        raise SystemExit("relion_reconstruct is not on PATH")
    cmd = [exe, "--i", "particles.star", "--o", "relion_map.mrc", "--ctf"]
    if threads > 1:
        cmd += ["--j", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=data, check=True, capture_output=True)
    dt = time.perf_counter() - t0
    return read_volume(data / "relion_map.mrc")[0], dt


def run_ours(data: Path, device: str) -> tuple[np.ndarray, float]:
    """Our Wiener reconstruction of data/particles.star (reading included); returns the full map and wall time."""
    t0 = time.perf_counter()
    r = reconstruct_particles(read_particles(data / "particles.star"), device=device, progress=io.StringIO())
    return r.full, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["example", "adk-closure"],
                   help="example, adk-closure, hivpr-mode")
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--work", default="/tmp/flexplugin_bench_reconstruct")
    p.add_argument("--refdata", default=os.environ.get("FLEXPLUGIN_REFDATA", ".cache/refdata"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="relion_reconstruct --j (and torch threads)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each program, alternating; the fastest counts")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    for name in a.data:
        data = Path(a.work) / f"{name}_n{a.n}_b{a.box}_snr{a.snr:g}"
        make_data(name, data, a.n, a.box, Path(a.refdata), a.snr)
        truth, apix = read_volume(data / "consensus.mrc")
        t_rel, t_ours = [], []
        for _ in range(a.repeat):  # alternate, so that both see the same load of a shared machine
            rel, t = run_relion(data, a.threads)
            t_rel.append(t)
            ours, t = run_ours(data, a.device)
            t_ours.append(t)
        t_rel, t_ours = min(t_rel), min(t_ours)
        f_rel = fsc(torch.from_numpy(rel), torch.from_numpy(truth))
        f_ours = fsc(torch.from_numpy(ours), torch.from_numpy(truth))
        diff = f_ours - f_rel
        print(f"\n== {name}: {a.n} particles, box {a.box}, {apix:.3f} Å/px, SNR {a.snr:g}")
        print(f"time (fastest of {a.repeat}): ours {t_ours:.2f} s, relion_reconstruct {t_rel:.2f} s, "
              f"ratio ours/RELION {t_ours / t_rel:.2f}")
        print("shell  res(Å)   FSC_truth ours  RELION   diff")
        for s in range(1, len(diff)):
            print(f"{s:5d} {a.box * apix / s:7.2f}   {f_ours[s]:8.4f} {f_rel[s]:8.4f} {diff[s]:+8.4f}")
        worst = 1 + int(np.argmin(diff[1:]))
        print(f"min diff ours − RELION over shells 1..{len(diff) - 1}: {diff[worst]:+.4f} at shell {worst} "
              f"({a.box * apix / worst:.2f} Å)")


if __name__ == "__main__":
    main()
