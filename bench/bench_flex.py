"""3D Flex training throughput and peak memory at boxes 64 and 128, and the ratio to cryoDRGN's train_vae.

Run: .venv/bin/python bench/bench_flex.py [--n 512] [--device cpu|cuda] [--boxes 64,128]
Everything is measured in this one run on the same simulated particles; the numbers printed are ratios
and rates, never thresholds. cryoDRGN is optional (pip install cryodrgn); without it the ratio is skipped.
The epoch timed is the most expensive one (k_max at 80 % of Nyquist, the full training box).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexplugin.engine.flex.mesh import build_mesh  # noqa: E402
from flexplugin.engine.flex.prep import PreparedParticles, prep_spec, prep_volume  # noqa: E402
from flexplugin.engine.flex.train import FlexTrainer, TrainConfig  # noqa: E402
from flexplugin.engine.io import read_particles, read_volume  # noqa: E402
from flexplugin.engine.simulate import SimConfig, simulate_dataset  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_ours(data: Path, box: int, device: str) -> tuple[float, float]:
    """Particles per second of one full-resolution epoch, and peak memory (MB; GPU: allocated)."""
    ps = read_particles(data / "particles.star")
    vol, apix = read_volume(data / "consensus.mrc")
    mesh = build_mesh(vol, apix, cells=20)
    spec = prep_spec(ps.box, ps.apix, None, box)
    cfg = TrainConfig(k=2, epochs=1, kmax_start=0.8, kmax_final=0.8, batch_size=64, noise_particles=256)
    tr = FlexTrainer(PreparedParticles(ps, spec), prep_volume(vol, spec), mesh, cfg, device)
    tr.estimate_noise(progress=lambda s: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.run_epoch(progress=lambda s: None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    mem = torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_rss_mb()
    return len(ps) / dt, mem


def bench_cryodrgn(data: Path, box: int, workdir: Path) -> float | None:
    """Particles per second of one cryoDRGN train_vae epoch on the same particles (None if not installed)."""
    exe = shutil.which("cryodrgn")
    if exe is None:
        return None
    star = data / "particles.star"
    poses, ctf = workdir / "poses.pkl", workdir / "ctf.pkl"
    ps = read_particles(star)
    run = lambda *a: subprocess.run([exe, *a], check=True, capture_output=True)  # noqa: E731
    run("parse_pose_star", str(star), "-o", str(poses), "-D", str(ps.box), "--Apix", str(ps.apix))
    run("parse_ctf_star", str(star), "-o", str(ctf), "-D", str(ps.box), "--Apix", str(ps.apix))
    t0 = time.perf_counter()
    run("train_vae", str(star), "--poses", str(poses), "--ctf", str(ctf), "--zdim", "2", "-n", "1",
        "-o", str(workdir / "vae"), "--datadir", str(data))
    return len(ps) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--boxes", default="64,128")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    print(f"bench_flex: {a.n} particles, device {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for box in (int(b) for b in a.boxes.split(",")):
            data = tmp / f"box{box}"
            simulate_dataset(SimConfig(n=a.n, box=box, apix=128.0 / box), data, progress=lambda s: None)
            rate, mem = bench_ours(data, box, a.device)
            line = f"box {box:4d}: flexplugin {rate:8.1f} particles/s per epoch, peak memory {mem:8.0f} MB"
            try:
                wd = tmp / f"drgn{box}"
                wd.mkdir()
                other = bench_cryodrgn(data, box, wd)
            except subprocess.CalledProcessError as e:
                other = None
                line += f" | cryoDRGN failed: {e.stderr.decode()[-200:]!r}"
            if other is not None:
                line += f" | cryoDRGN train_vae {other:8.1f} particles/s | ratio ours/cryoDRGN {rate / other:.2f}x"
            elif "failed" not in line:
                line += " | cryoDRGN not installed: ratio not measured"
            print(line, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
