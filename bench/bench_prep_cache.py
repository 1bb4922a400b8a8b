"""Memory and time of flex-train's data path against the number of particles, with and without the
prepared-particles cache (flex-train --scratch, flexplugin/engine/flex/cache.py).

For each N (default 10k, 50k, 100k) a synthetic set is written to a temporary folder: random-noise images at
box 128 in MRC stacks of 5,000 (written in chunks with mrcfile, not projections: only the bytes matter here)
and a RELION 3.1 STAR with random poses, shifts and CTF. Then, each in a fresh process so its peak memory is
its own, at training box 64:

* `fly`: one epoch of PreparedParticles.batch over all particles in a shuffled order, batches of 64 (what
  flex-train's epoch reads), cropping the full-box images on the fly;
* `build`: building the cache (reading and cropping every image once, writing float16);
* `cached`: the same epoch read from the cache;
* with `--workers W`, also `fly+W` and `cached+W`: the same epochs through PreparedParticles.loader, W DataLoader
  worker processes preparing the batches ahead (peak memory then is the main process's only).

Printed per N and mode: seconds, the process's peak resident memory (VmHWM) and its peak anonymous memory
(RssAnon sampled after every batch; memory-mapped file pages are counted in VmHWM but are page cache the
kernel can drop, anonymous memory is not), and the cache's size. The data are deleted afterwards.

    python bench/bench_prep_cache.py [--sizes 10000,50000,100000] [--dir /tmp] [--box 128 --train-box 64]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STACK = 5000


def make_set(folder: Path, n: int, box: int, seed: int = 0) -> Path:
    """Random-noise stacks and a STAR with random poses, shifts and CTF for `n` particles at `box`."""
    import mrcfile
    import pandas as pd
    import starfile
    rng = np.random.default_rng(seed)
    names = []
    for s in range(0, n, STACK):
        m = min(STACK, n - s)
        path = folder / f"stack_{s // STACK:04d}.mrcs"
        with mrcfile.new_mmap(path, shape=(m, box, box), mrc_mode=2, overwrite=True) as mrc:
            for c in range(0, m, 1000):
                k = min(1000, m - c)
                mrc.data[c:c + k] = rng.standard_normal((k, box, box), dtype=np.float32)
            mrc.set_image_stack()
            mrc.voxel_size = 2.0
        names += [f"{i + 1}@{path.name}" for i in range(m)]
    du = rng.uniform(8000, 25000, n)
    parts = pd.DataFrame({
        "rlnImageName": names, "rlnImageId": np.arange(1, n + 1), "rlnOpticsGroup": 1,
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": np.degrees(np.arccos(rng.uniform(-1, 1, n))),
        "rlnAnglePsi": rng.uniform(-180, 180, n), "rlnOriginXAngst": rng.normal(0, 2, n),
        "rlnOriginYAngst": rng.normal(0, 2, n), "rlnDefocusU": du, "rlnDefocusV": du + rng.uniform(0, 500, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n)})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnImagePixelSize": [2.0],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1]})
    star = folder / "particles.star"
    starfile.write({"optics": optics, "particles": parts}, star, overwrite=True)
    return star


def _status(key: str) -> int:
    """A /proc/self/status memory figure in bytes (0 where /proc is absent)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(star: str, mode: str, scratch: str, train_box: int, batch: int, workers: int = 0) -> dict:
    """One mode in this process: seconds, peak VmHWM and peak RssAnon."""
    import torch
    torch.set_num_threads(1)
    from flexplugin.engine.flex.cache import open_cache
    from flexplugin.engine.flex.prep import PreparedParticles, prep_spec
    from flexplugin.engine.io import read_particles
    ps = read_particles(star)
    spec = prep_spec(ps.box, ps.apix, None, train_box)
    anon = _status("RssAnon")
    t0 = time.perf_counter()
    cache = open_cache(ps, spec, Path(scratch), "cpu", lambda s: None) if not mode.startswith("fly") else None
    if mode == "build":
        return {"seconds": time.perf_counter() - t0, "peak_rss": _status("VmHWM"),
                "peak_anon": max(anon, _status("RssAnon")), "cache_bytes": cache.images16.nbytes}
    pp = PreparedParticles(ps, spec, cache)
    order = np.random.default_rng(0).permutation(len(pp))
    batches = [np.sort(order[s:s + batch]) for s in range(0, len(order), batch)]
    t0 = time.perf_counter()
    for b in pp.loader(batches, "cpu", workers if "+" in mode else 0):
        assert b["images"].shape[-1] == train_box
        anon = max(anon, _status("RssAnon"))
    return {"seconds": time.perf_counter() - t0, "peak_rss": _status("VmHWM"), "peak_anon": anon}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,50000,100000")
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--train-box", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="also time the epochs with this many loader workers")
    ap.add_argument("--dir", default="/tmp", help="where the synthetic sets and the cache are written (deleted)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # star mode scratch: one measurement
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], a.child[1], a.child[2], a.train_box, a.batch, a.workers)))
        return
    gib = 2.0 ** 30
    print(f"box {a.box}, training box {a.train_box}, batches of {a.batch}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print("| particles | stack GiB | mode | seconds | peak RSS GiB | peak anonymous GiB |")
    print("|---|---|---|---|---|---|", flush=True)
    for n in (int(x) for x in a.sizes.split(",")):
        root = Path(tempfile.mkdtemp(prefix="bench_prep_cache_", dir=a.dir))
        try:
            t0 = time.perf_counter()
            star = make_set(root, n, a.box)
            stack = n * a.box * a.box * 4 / gib
            print(f"(N={n}: wrote {stack:.2f} GiB of stacks in {time.perf_counter() - t0:.0f} s)", file=sys.stderr,
                  flush=True)
            res = {}
            extra = [f"fly+{a.workers}", f"cached+{a.workers}"] if a.workers > 0 else []
            for mode in ["fly", "build", "cached", *extra]:
                r = subprocess.run([sys.executable, __file__, "--child", str(star), mode, str(root / "scratch"),
                                    "--train-box", str(a.train_box), "--batch", str(a.batch),
                                    "--workers", str(a.workers)],
                                   capture_output=True, text=True, check=True)
                res[mode] = json.loads(r.stdout.splitlines()[-1])
                print(f"| {n} | {stack:.2f} | {mode} | {res[mode]['seconds']:.1f} | {res[mode]['peak_rss'] / gib:.2f} "
                      f"| {res[mode]['peak_anon'] / gib:.3f} |", flush=True)
            print(f"(N={n}: cache {res['build']['cache_bytes'] / gib:.2f} GiB; epoch without/with the cache "
                  f"{res['fly']['seconds'] / res['cached']['seconds']:.1f}x)", flush=True)
            if extra:
                print(f"(N={n}: epoch with {a.workers} loader workers / without: fly "
                      f"{res[extra[0]]['seconds'] / res['fly']['seconds']:.2f}, cached "
                      f"{res[extra[1]]['seconds'] / res['cached']['seconds']:.2f})", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
