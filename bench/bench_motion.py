"""Does 3D Flex learn real motions at its defaults? Full-size benchmark on real structures (the CI test is small).

Run: .venv/bin/python bench/bench_motion.py [--n 3000] [--box 128] [--train-boxes 32,64] [--cells 20,30]
     [--masks auto,dataset] [--datasets adk-closure,hivpr-mode,example] [--device cuda] [--work DIR]

For each data set (pdb_motion.BENCHMARKS from the mdanalysistests sdist in the reference cache, fetched by
`make test-setup`, plus the built-in example), this simulates the particles (96 Å box: 1.5 Å/px at box 64,
0.75 Å/px at box 128; the example at its 128 Å), runs 3DVA (K 2) for a seed, then trains 3D Flex at
flex-train's defaults for every training box × mesh (cells × mask) and prints, per run:
- the cross-validated |Spearman ρ| of the best linear read-out of the true motion (random latents K 1 and K 2,
  and seeded from 3DVA next to the seed's own ρ), and the oracle |ρ| (benchmark.oracle_rho: latents searched over
  the true state maps with the same likelihood and band, the ceiling of any latent inference there);
- the gain in masked correlation over the consensus of the maps generated at the true end states' latents
  (inside the moving-domain mask) and whether the series runs through the states in order;
- the seconds of each run. Nothing is a threshold here: the targets are asserted by tests/engine/test_flex_benchmark.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flexplugin.engine.flex.benchmark import run_and_score
from flexplugin.engine.flex.scoring import readout_rho
from flexplugin.engine.flex.train import TrainConfig, normalize_init_latents
from flexplugin.engine.io import read_particles, read_volume
from flexplugin.engine.pdb_motion import BENCHMARKS, make_benchmark
from flexplugin.engine.simulate import SimConfig, simulate_dataset

SDIST = "mdanalysistests-2.11.0"


def make_data(name: str, out: Path, n: int, box: int, refdata: Path) -> None:
    """Simulate once (kept in the work folder: reruns reuse it)."""
    if (out / "particles.star").exists():
        return
    if name == "example":
        simulate_dataset(SimConfig(n=n, box=box, apix=128.0 / box, snr=0.1, seed=5), out, progress=lambda s: None)
    else:
        make_benchmark(name, refdata / SDIST, out, n=n, box=box, apix=96.0 / box, snr=0.1, seed=1,
                       progress=lambda s: None)


def seed_3dva(data: Path, ids, filter_res: float) -> tuple:
    """3DVA K 2 coordinates of the particles (by id) and the folder they came from."""
    out = data / "va3d"
    if not (out / "latents.csv").exists():
        subprocess.run([sys.executable, "-m", "flexplugin.cli", "3dva", "--particles", str(data / "particles.star"),
                        "--volume", str(data / "consensus.mrc"), "--mask", str(data / "mask.mrc"), "--out", str(out),
                        "--k", "2", "--filter-res", str(filter_res)], check=True, capture_output=True)
    va = pd.read_csv(out / "latents.csv").set_index("rlnImageId").loc[ids]
    return va[["z0", "z1"]].to_numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default=",".join([*BENCHMARKS, "example"]))
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--train-boxes", default="32,64")
    ap.add_argument("--cells", default="20,30", help="mesh cells across the box (20 is flex-mesh's default)")
    ap.add_argument("--masks", default="auto,dataset", help="auto: flex-mesh's mask from the map; dataset: mask.mrc")
    ap.add_argument("--runs", default="k1,k2,seeded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench_motion"))
    ap.add_argument("--refdata", default=os.environ.get("FLEXPLUGIN_REFDATA", str(ROOT / ".cache" / "refdata")))
    a = ap.parse_args()
    work = Path(a.work)
    print(f"bench_motion: {a.n} particles, box {a.box}, training boxes {a.train_boxes}, cells {a.cells}, "
          f"masks {a.masks}, device {a.device}", flush=True)
    results = []
    for name in a.datasets.split(","):
        data = work / f"{name}-n{a.n}-b{a.box}"
        make_data(name, data, a.n, a.box, Path(a.refdata))
        ps = read_particles(data / "particles.star")
        truth = pd.read_csv(data / "ground_truth.csv").set_index("rlnImageId").loc[ps.ids, "motion"].to_numpy()
        seed = rho_seed = None
        if "seeded" in a.runs:
            t0 = time.monotonic()
            seed = seed_3dva(data, ps.ids, filter_res=max(6.0, 4 * ps.apix))
            rho_seed = readout_rho(seed, truth)
            print(f"{name}: 3DVA seed |rho| {rho_seed:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
        for tb in (int(x) for x in a.train_boxes.split(",")):
            for cells in (int(x) for x in a.cells.split(",")):
                for mask_kind in a.masks.split(","):
                    mask = None if mask_kind == "auto" else read_volume(data / "mask.mrc")[0]
                    for run in a.runs.split(","):
                        k = 1 if run == "k1" else 2
                        init = normalize_init_latents(seed, 2) if run == "seeded" else None
                        _, s = run_and_score(data, tb, TrainConfig(k=k), init, cells, mask, ps, a.device)
                        s.update(dataset=name, run=run, mask=mask_kind, seed_rho=rho_seed if run == "seeded" else None)
                        results.append(s)
                        seed_txt = f" (seed {rho_seed:.3f})" if run == "seeded" else ""
                        print(f"{name:12s} box {tb:3d} cells {cells:2d} ({s['cells']:6d} tets) mask {mask_kind:7s} "
                              f"{run:6s} |rho| {s['rho']:.3f}{seed_txt} oracle {s['oracle_rho']:.3f} "
                              f"| end gains {s['end_gains'][0]:+.3f} "
                              f"{s['end_gains'][1]:+.3f} | order {s['order_rho']:.2f} | flow {s['max_flow_A']:.1f} Å "
                              f"| {s['seconds']:.0f} s", flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"bench_motion: {len(results)} runs; results.json in {work}")


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
